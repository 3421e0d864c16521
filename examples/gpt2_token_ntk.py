"""The eNTK between token positions of a small random GPT-2 (HuggingFace), before and after a little training.

A character-level GPT-2 (``transformers.GPT2LMHeadModel`` from a config, random weights, no
download) is trained for a few Adam steps on next-character prediction over a toy corpus.
Before, during and after, ntkfunc computes the eNTK of its logits on a held-out sentence:

- ``ntk_fn(f, trace_axes=(-1,))`` on logits ``(N, T, V)``: the kernel between token
  positions ``Θ[t, t'] = (1/V) Σ_v ∂f_{t,v}/∂θ · ∂f_{t',v}/∂θ`` (the vocabulary traced), of
  shape ``(1, 1, T, T)`` for one sentence;
- ``pntk_fn(f)``: the kernel of the sum of logits (one VJP per sample);
- ``explain``: every parameter on a structured rule, the token embedding tied to the LM
  head as one rule with cross terms.

Figure ``gpt2_token_ntk.png``: the position kernel at initialisation and after training
(normalised by its diagonal), its relative change ``|Θ_t - Θ₀|_F / |Θ₀|_F`` and the training
loss over steps. Printed: the same numbers.

Run: ``python examples/gpt2_token_ntk.py`` (about a minute on 2 CPU cores; needs
transformers: ``pip install -e '.[integrations]'``).
"""

from __future__ import annotations

import _common as C
import _libraries as L
import torch

import ntkfunc

CORPUS = (
    "the cat sat on the mat. the dog sat on the log. a cat and a dog sat on a mat. "
    "the cat saw the dog. the dog saw the cat on the log. "
)
PROBE = "the dog sat on the mat."


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    return torch.tensor([vocab.index(ch) for ch in text])


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help="Adam steps (default 60; --quick: 6)")
    args = p.parse_args()
    device = C.setup(args)
    tr = L.load("transformers")
    steps = C.optional(args.steps, 6, 60, args)
    vocab = sorted(set(CORPUS + PROBE))
    width, layers, block = (16, 1, 12) if args.quick else (64, 2, 24)
    cfg = tr.GPT2Config(vocab_size=len(vocab), n_positions=block, n_embd=width, n_layer=layers, n_head=4 if width >= 32 else 2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = tr.GPT2LMHeadModel(cfg).to(device).eval()  # no dropout: eval mode for the kernels and the training
    data = encode(CORPUS, vocab).to(device)
    probe = encode(PROBE[:block], vocab).to(device).unsqueeze(0)  # (1, T)

    f, _ = ntkfunc.from_module(model)  # logits (N, T, V); input_ids positional, use_cache=False
    kernel = ntkfunc.ntk_fn(f, trace_axes=(-1,), implementation="auto")  # (N1, N2, T, T): vocabulary traced
    pntk = ntkfunc.pntk_fn(f)

    def snapshot() -> tuple[torch.Tensor, float]:
        params = {k: v.detach() for k, v in model.named_parameters()}
        return kernel(probe, None, params)[0, 0], float(pntk(probe, None, params))

    report = ntkfunc.explain(f, {k: v.detach() for k, v in model.named_parameters()}, probe, trace_axes=(-1,))
    print(report)
    print(f"parameters on a rule: {sum(r.method == 'rule' for r in report.params)} of {len(report.params)} tensors")

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(args.seed)
    theta0, pntk0 = snapshot()
    every = max(1, steps // 6)
    record, losses = [(0, 0.0)], []
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(data) - block - 1, (8,), generator=gen)
        batch = torch.stack([data[s : s + block + 1] for s in starts.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, 1:], use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % every == 0 or step == steps:
            theta, _ = snapshot()
            record.append((step, float((theta - theta0).norm() / theta0.norm())))
    theta_t, pntk_t = snapshot()

    print(C.table(["step", "|Θ_t - Θ₀| / |Θ₀|"], [(s, f"{d:.3f}") for s, d in record]))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; pNTK of the probe {pntk0:.4g} -> {pntk_t:.4g}")

    def normalised(k: torch.Tensor) -> torch.Tensor:
        d = k.diagonal().clamp_min(1e-30).sqrt()
        return (k / d[:, None] / d[None, :]).cpu()

    fig, axes = C.figure(4, size=(3.6, 3.2))
    labels = list(PROBE[: probe.shape[1]])
    for ax, k, title in ((axes[0], theta0, "Θ₀ (init), normalised"), (axes[1], theta_t, f"Θ after {steps} steps")):
        im = ax.imshow(normalised(k), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(labels)), labels, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[2].plot([s for s, _ in record], [d for _, d in record], "o-")
    axes[2].set(xlabel="step", ylabel="|Θ_t - Θ₀|_F / |Θ₀|_F", title="kernel change")
    axes[3].plot(range(1, steps + 1), losses)
    axes[3].set(xlabel="step", ylabel="cross-entropy", title="training loss")
    C.save(fig, args.out, "gpt2_token_ntk.png")


if __name__ == "__main__":
    main()
