"""The fused ops inside a hand-written PGD loop: what a user's training code looks like with robust_ext.

Runs in a few seconds on a CPU: a small CNN, random images, PGD-10 at eps = 8/255 with a random start.
"""
import torch
import torch.nn.functional as F

import robust_ext
from robust_ext import ops


def pgd(model, x, y, eps, alpha, steps, generator=None):
    x_adv = ops.linf_random_init(x, eps, generator=generator)           # clip(x + U(-eps, eps))
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)                     # w.r.t. the input only
        x_adv = x_adv.detach()
        ops.linf_step_(x_adv, grad, x, alpha, eps)                      # step + project + clip, one pass
    return x_adv


def main():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 16, 10)).eval()
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
    eps = torch.full((64,), 8 / 255)
    eps[:32] = 4 / 255                                                   # per-sample budgets
    x_adv = pgd(model, x, y, eps, alpha=2 / 255, steps=10, generator=torch.Generator().manual_seed(1))
    dist = (x_adv - x).abs().amax(dim=(1, 2, 3))
    print(f"backend: {robust_ext.backend()}")
    print(f"max |x_adv - x| for eps=4/255 rows: {dist[:32].max() * 255:.3f}/255, eps=8/255 rows: {dist[32:].max() * 255:.3f}/255")
    clean = (model(x).argmax(1) == y).float().mean().item()
    adv = (model(x_adv).argmax(1) == y).float().mean().item()
    print(f"accuracy of an untrained model: clean {clean:.3f}, under PGD-10 {adv:.3f}")


if __name__ == "__main__":
    main()
