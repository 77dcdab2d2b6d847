"""
Muon (Jordan et al. 2024): the optimizer for the blocks' matrices, with the AdamW it pairs with written out
so that one optimizer holds both and saves and resumes as one. GPT.configure_optimizers (model.py) builds it
when given matrix_lr; it sits in its own module, as nanochat keeps muon.py and as the fused kernel sits in
flash_attention.py, so that model.py stays about the GPT.
"""
import torch


def orthogonalize(G, steps=5):
    """U V^T of G = U S V^T, approximately: the update with every singular value set to 1, by a
    quintic Newton-Schulz iteration whose coefficients push singular values toward 1 in five steps of
    matmuls instead of an SVD (Jordan et al. 2024; it lands them in about [0.7, 1.2], which is enough).
    G: (..., rows, cols), a batch of matrices."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values at most 1
    tall = X.size(-2) > X.size(-1)
    X = X.mT if tall else X  # iterate on the smaller Gram matrix
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for the groups marked muon=True: SGD with Nesterov momentum whose
    update of each matrix is orthogonalized, so that every direction of the matrix moves at the
    same rate instead of the few that dominate the gradient; scaled by sqrt(max(1, rows / cols)).
    The other groups (embeddings, heads, gains) take AdamW, written out here so that one optimizer
    holds both and saves and resumes as one."""

    def __init__(self, groups, lr, betas, momentum=0.95, eps=1e-8):
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, eps=eps, muon=False, split=1))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, g = self.state[p], p.grad
                p.mul_(1 - lr * decay)  # decoupled weight decay (Loshchilov & Hutter 2019)
                if group["muon"]:
                    buf = state.setdefault("momentum", torch.zeros_like(g))
                    buf.lerp_(g, 1 - group["momentum"])
                    g = g.lerp(buf, group["momentum"])  # Nesterov: the gradient, then the momentum, blended
                    g = orthogonalize(g.view(group["split"], -1, g.size(-1))).view_as(g)
                    p.add_(g, alpha=-lr * max(1, g.size(-2) / group["split"] / g.size(-1)) ** 0.5)
                    continue
                if not state:
                    state.update(step=0, m=torch.zeros_like(g), v=torch.zeros_like(g))
                state["step"] += 1
                (b1, b2), t = group["betas"], state["step"]
                state["m"].lerp_(g, 1 - b1)
                state["v"].lerp_(g.square(), 1 - b2)
                denominator = (state["v"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["m"], denominator, value=-lr / (1 - b1 ** t))
