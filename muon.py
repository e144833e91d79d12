"""Muon for the LLM's hidden matrices, AdamW for every other parameter: the shapes world's optimizer.

Molmo2 trains with AdamW (train.py's default, `optimizer = "adamw"`), and its LLM arrives pretrained. The shapes world's
LLM starts random, and in the 20 minutes a CPU has it must learn to *look things up* in its context: to carry
"the blue star" from the question to the image token that holds a blue star and read that token's place. Under
AdamW a 4-layer LLM barely starts that lookup in ~800 steps (pointing at one named object among several stays at
chance); under Muon it does (docs/experiments.md: pointing F1 0.35 -> 0.73 at equal steps, the same model and data).

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) updates a weight matrix W (out, in) by the
*orthogonalised* momentum of its gradient: with M the momentum (Nesterov, 0.95) and M = U S V^T its SVD, the step
is U V^T, every singular direction moved by the same amount. AdamW's step of a matrix is dominated by a few large
directions; the small ones, where a new circuit such as a lookup head starts, barely move. U V^T is approximated
by five Newton-Schulz iterations (matmuls only, no SVD), which give U S' V^T with S' roughly in [0.7, 1.2] (a
direction below ~1/500 of the gradient's norm stays short: each iteration lifts a small one by at most 3.4x).
Its size follows Liu et al. 2025 ("Muon is Scalable for LLM Training", Moonlight): U V^T times 0.2 sqrt(max(out,
in)) has the RMS of a typical AdamW step (0.2), so a Muon group runs at the same learning rate as AdamW would.

Only 2-D matrices inside the LLM's blocks (attention qkv and output, MLP up/gate and down) take Muon. Embeddings,
the LM head, norm gains, the connector and the ViT stay on AdamW, as Muon's authors prescribe for inputs, outputs
and vectors. Each parameter group says which it is (`muon=True`); the AdamW groups are torch's own AdamW, stepped
with the same settings as under `optimizer = "adamw"`.

Written here rather than taken from torch.optim.Muon, which runs Newton-Schulz in bf16: on a CPU without native
bf16 matmuls (AVX2) its step for this 3.4M-parameter LLM takes ~7 s, against ~0.15 s in fp32.
"""
import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the quintic's (a, b, c), chosen for the steepest slope at 0 (Jordan)
NS_STEPS = 5
MOMENTUM = 0.95                        # Muon's momentum, Nesterov form (Jordan; Moonlight)


def orthogonalize(g, steps=NS_STEPS):
    """g (out, in) -> ~U V^T of g = U S V^T, by Newton-Schulz: X <- a X + (b A + c A^2) X with A = X X^T, from X = g
    over its Frobenius norm (so every singular value starts <= 1). Runs on the short side: A is (min, min)."""
    a, b, c = NS_COEFFS
    x = g.float() / (g.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * (A @ A)) @ x
    return (x.T if tall else x).to(g.dtype)


def muon_matrices(model):
    """The LLM's hidden matrices (names under llm.blocks, 2-D), the ones Muon updates."""
    return [p for n, p in model.named_parameters() if n.startswith("llm.blocks.") and p.ndim == 2 and p.requires_grad]


class MuonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW over the groups without `muon=True`; Muon over the groups with it. A Muon group's lr and
    weight_decay are read as AdamW's are (the schedule sets lr on every group alike); its state per matrix is
    `momentum_buffer` and `step`."""

    def __init__(self, params, **adamw_kwargs):
        super().__init__(params, **adamw_kwargs)
        for g in self.param_groups:
            g.setdefault("muon", False)
            if g["muon"] and any(p.ndim != 2 for p in g["params"]):
                raise ValueError("a muon=True group holds only 2-D matrices")

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            if not g["muon"]:
                continue
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # `step` as AdamW keeps it (a tensor): one checkpoint format for every group
                    state["step"], state["momentum_buffer"] = torch.tensor(0.0), torch.zeros_like(p)
                state["step"] += 1
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - MOMENTUM)                  # m <- 0.95 m + 0.05 g
                update = orthogonalize(p.grad.lerp(buf, MOMENTUM))  # Nesterov: 0.05 g + 0.95 m, orthogonalised
                p.mul_(1 - g["lr"] * g["weight_decay"])          # decoupled weight decay, as AdamW's
                p.add_(update, alpha=-g["lr"] * 0.2 * max(p.shape) ** 0.5)  # RMS 0.2 x lr (Moonlight)
        everything = self.param_groups  # torch's AdamW then steps the other groups, exactly as it would alone
        self.param_groups = [g for g in everything if not g["muon"]]
        try:
            return super().step(closure)
        finally:
            self.param_groups = everything
