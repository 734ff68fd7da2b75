"""A PixelCNN prior over a VQ-VAE's code grid (van den Oord et al. 2016, "Pixel recurrent neural
networks"; as the learned prior of van den Oord et al. 2017): p(c) = prod_i p(c_i | c_<i) in raster
order, each factor a softmax over the K codes from masked convolutions.

A mask of type "A" (the first layer) lets position i see positions < i only; type "B" (the later
layers) also i itself, which after an "A" layer carries only < i. So no output sees its own code or
a later one (tested). Plain masked convolutions have the PixelCNN's blind spot (a wedge of earlier
positions to the upper right is unseen); the gated, two-stack PixelCNN (van den Oord et al. 2016b)
removes it, at more code than a 7x7 grid needs.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from pyro_vae.errors import DataError
from pyro_vae.second_stage import LATENT_PRIORS, Latents, PriorError


class MaskedConv2d(nn.Conv2d):
    """A k x k convolution whose weights at and after the centre (type "A") or after it ("B"),
    in raster order, are zero."""

    def __init__(self, c_in: int, c_out: int, kernel: int, mask_type: str):
        super().__init__(c_in, c_out, kernel, padding=kernel // 2)
        mask = torch.ones(kernel, kernel)
        centre = kernel // 2
        mask[centre, centre + (mask_type == "B"):] = 0
        mask[centre + 1:] = 0
        self.register_buffer("mask", mask[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class _Block(nn.Module):
    """h + 1x1(ReLU(masked 3x3 "B"(ReLU(1x1(h)))))."""

    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c // 2, 1), nn.ReLU(), MaskedConv2d(c // 2, c // 2, 3, "B"),
                                 nn.ReLU(), nn.Conv2d(c // 2, c, 1))

    def forward(self, h):
        return h + self.net(h)


class PixelCNNNet(nn.Module):
    """codes (n, H, W) -> logits (n, K, H, W): an embedding of the codes, a 7x7 "A" masked
    convolution, ``blocks`` residual "B" blocks and two 1x1 convolutions to K logits."""

    def __init__(self, num_codes: int, hidden: int = 64, blocks: int = 5):
        super().__init__()
        self.embed = nn.Embedding(num_codes, hidden)
        self.first = MaskedConv2d(hidden, hidden, 7, "A")
        self.blocks = nn.Sequential(*[_Block(hidden) for _ in range(blocks)])
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, num_codes, 1))

    def logits_from_embedding(self, e: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.first(e)))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.logits_from_embedding(self.embed(codes.long()).permute(0, 3, 1, 2))


@LATENT_PRIORS.register("pixelcnn")
class PixelCNNPrior(nn.Module):
    """The autoregressive prior over code grids (H, W) of a VQ-VAE run, fitted by maximum
    likelihood (Adam, cross-entropy over the training codes, cosine-decayed learning rate).
    ``log_prob(codes)`` is log p(c) in nats per grid; ``sample`` draws H*W positions in turn."""

    takes_codes = True

    def __init__(self, shape, num_codes: int = 512, hidden: int = 64, blocks: int = 5, train_steps: int = 2000,
                 batch_size: int = 128, lr: float = 1e-3, seed: int = 0):
        super().__init__()
        if len(shape) != 2:
            raise DataError(f"a pixelcnn prior takes code grids (H, W), these are {tuple(shape)}")
        self.shape, self.num_codes, self.hidden, self.blocks = list(shape), num_codes, hidden, blocks
        self.train_steps, self.batch_size, self.lr, self.seed = train_steps, batch_size, lr, seed
        self.net = PixelCNNNet(num_codes, hidden, blocks)
        self.register_buffer("fitted", torch.tensor(False))

    def options(self) -> dict:
        return {"shape": self.shape, "num_codes": self.num_codes, "hidden": self.hidden, "blocks": self.blocks,
                "train_steps": self.train_steps, "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed}

    def log_prob(self, codes: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """log p(c) per grid, (n,)."""
        out = []
        for i in range(0, len(codes), batch_size):
            c = codes[i:i + batch_size].long()
            logp = self.net(c).log_softmax(1).gather(1, c[:, None]).squeeze(1)
            out.append(logp.flatten(1).sum(1))
        return torch.cat(out)

    def fit(self, latents: Latents, progress: bool = False) -> dict:
        if latents.codes is None:
            raise PriorError("a pixelcnn prior is fitted to a VQ-VAE's code indices; this run's latents are "
                             "Gaussian: use --kind diffusion or gmm")
        codes = latents.codes.long()
        torch.manual_seed(self.seed)
        g = torch.Generator(device=codes.device).manual_seed(self.seed)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.train_steps)
        losses, t0 = [], time.perf_counter()
        self.net.train()
        for step in range(self.train_steps):
            batch = codes[torch.randint(len(codes), (min(self.batch_size, len(codes)),), generator=g, device=codes.device)]
            loss = -self.log_prob(batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())
            if progress and (step + 1) % 500 == 0:
                print(f"  step {step + 1}/{self.train_steps}: -log p(c) {float(torch.stack(losses[-500:]).mean()):.2f} "
                      f"nats", flush=True)
        self.net.eval()
        self.fitted.fill_(True)
        with torch.no_grad():
            train_nll = float(-self.log_prob(codes[:5000]).mean())
        return {"train_nll": train_nll, "seconds": time.perf_counter() - t0, "steps": self.train_steps}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, **_) -> torch.Tensor:
        """n code grids (n, H, W), position by position in raster order."""
        self.eval()
        h, w = self.shape
        device = self.net.embed.weight.device
        codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
        for i in range(h):
            for j in range(w):
                probs = self.net(codes)[:, :, i, j].softmax(1)
                codes[:, i, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return codes
