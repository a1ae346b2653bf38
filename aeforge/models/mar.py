"""MAR — masked autoregressive generation with a per-token diffusion loss (Li et al., NeurIPS 2024), the visual
encoder of Harmon (Wu et al., ICCV 2025); card 9 of /work/shared/methods/mae_family.md.

An MAE over continuous tokens: the encoder sees the visible tokens plus `buffer_size` condition tokens (the class
embedding, or the learned `fake_latent` when unconditional / label-dropped), the decoder fills masked positions
with a learned mask token, and a small adaLN MLP (`DiffusionMLP`) denoises each token conditioned on the decoder
output (DDPM ε-prediction with a cosine schedule, optionally with the improved-DDPM learned variance). Mask ratio:
one per batch from a normal(1, 0.25) truncated to [mask_ratio_min, 1], so fully masked inputs occur in training
and sampling can start from nothing. Tokens: pixel patches (the CPU "pixel MAR", a deviation from the paper's
KL-16 VAE latents) or the latents of a frozen image tokenizer (`tokenizer`, anything with `encode`/`decode`).
The loss terms are aeforge/objectives/mar.py; the noise schedule is aeforge/nn/diffusion.py.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block
from torch import nn

from aeforge.models.base import AutoencoderModel
from aeforge.nn.diffusion import NoiseSchedule, timestep_embedding
from aeforge.nn.vit import LayerNorm, patchify, unpatchify


def truncated_normal_ratio(mean: float, std: float, low: float, high: float,
                           generator: torch.Generator | None = None) -> float:
    """One mask ratio from N(mean, std²) truncated to [low, high] (inverse-CDF sampling)."""
    a, b = (torch.tensor([(low - mean) / std, (high - mean) / std], dtype=torch.float64)).unbind()
    lo, hi = torch.special.ndtr(a), torch.special.ndtr(b)
    u = lo + (hi - lo) * torch.rand((), dtype=torch.float64, generator=generator)
    return float((mean + std * torch.special.ndtri(u)).clamp(low, high))


def random_orders(batch: int, length: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random token order per sample (B, L): the first tokens of an order are the ones masked."""
    return torch.argsort(torch.rand(batch, length, generator=generator, device="cpu"), dim=1).to(device)


def mask_by_order(orders: torch.Tensor, num_masked: int) -> torch.Tensor:
    """(B, L) float mask, 1 at the first `num_masked` positions of each order."""
    mask = torch.zeros(orders.shape, device=orders.device)
    return mask.scatter(1, orders[:, :num_masked], 1.0)


class AdaLNResBlock(nn.Module):
    """LN -> shift/scale from the condition -> Linear-SiLU-Linear -> gated residual."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DiffusionMLP(nn.Module):
    """MAR's per-token denoiser: noisy token x_t (N, C), timestep t (N,) and condition z (N, D) -> ε (N, C), plus
    C variance-interpolation values when `learn_sigma`. adaLN blocks; zero-initialised modulations and output
    (the DiT init), so it starts as the identity on its residual path."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, learn_sigma: bool):
        super().__init__()
        self.token_dim, self.learn_sigma = token_dim, learn_sigma
        self.time_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim * (2 if learn_sigma else 1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        for ada in [b.ada for b in self.blocks] + [self.final_ada]:
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = self.time_embed(timestep_embedding(t, 256)) + self.cond_embed(z)
        h = self.input_proj(x_t)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)


class MAR(AutoencoderModel):
    """input_shape (C, H, W). Tokens: `patch_size`×`patch_size` pixel patches (tokenizer null) or the frozen
    `tokenizer`'s latent pixels (`tokenizer.encode(x) -> (B, c, h, w)`, `decode`), times `token_scale`
    (the card's vae_scale: tokens of about unit variance). num_classes: class-conditional with `label_drop`
    (CFG); null or `conditional=false`: unconditional."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int | None = None,
        conditional: bool = True,
        patch_size: int = 4,
        tokenizer: nn.Module | None = None,
        token_scale: float = 1.0,
        embed_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        decoder_embed_dim: int = 192,
        decoder_depth: int = 4,
        decoder_num_heads: int = 3,
        mlp_ratio: float = 4.0,
        buffer_size: int = 8,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        label_drop: float = 0.1,
        mask_ratio_min: float = 0.7,
        mask_ratio_std: float = 0.25,
        diffloss_depth: int = 3,
        diffloss_width: int = 256,
        diffusion_batch_mul: int = 4,
        learn_sigma: bool = True,
        noise_schedule: str = "cosine",
        timesteps: int = 1000,
        sample_diffusion_steps: int = 100,
        temperature: float = 1.0,
        clip_x0: float | None = None,
        class_key: str = "y",
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"MAR needs (C, H, W) images, got input_shape={tuple(input_shape)}")
        if buffer_size < 1:
            raise ValueError("model.buffer_size must be >= 1: a fully masked input leaves the encoder only the "
                             "buffer tokens")
        if clip_x0 is not None and clip_x0 <= 0:
            raise ValueError(f"model.clip_x0 must be > 0 or null, got {clip_x0}")
        if not 0.0 < mask_ratio_min <= 1.0:
            raise ValueError(f"model.mask_ratio_min must be in (0, 1], got {mask_ratio_min}")
        c, h, w = input_shape
        self.input_shape, self.tokenizer, self.token_scale = (c, h, w), tokenizer, token_scale
        if tokenizer is None:
            if h % patch_size or w % patch_size:
                raise ValueError(f"model.patch_size={patch_size} does not divide the images ({h}x{w})")
            self.patch_size, self.grid, self.token_dim = patch_size, (h // patch_size, w // patch_size), \
                patch_size * patch_size * c
        else:
            tokenizer.requires_grad_(False)
            with torch.no_grad():
                lat = tokenizer.encode(torch.zeros(1, c, h, w))
            self.patch_size, self.grid, self.token_dim = 1, tuple(lat.shape[-2:]), lat.shape[1]
        self.seq_len = self.grid[0] * self.grid[1]
        self.num_classes = num_classes if conditional and num_classes else None
        self.buffer_size, self.label_drop, self.class_key = buffer_size, label_drop, class_key
        self.mask_ratio_min, self.mask_ratio_std = mask_ratio_min, mask_ratio_std
        self.diffusion_batch_mul, self.learn_sigma = diffusion_batch_mul, learn_sigma
        self.sample_diffusion_steps, self.temperature, self.clip_x0 = sample_diffusion_steps, temperature, clip_x0
        self.schedule = NoiseSchedule(kind=noise_schedule, steps=timesteps)
        self.timesteps = timesteps

        n = buffer_size + self.seq_len
        self.class_emb = nn.Embedding(self.num_classes or 1, embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, embed_dim))
        self.z_proj = nn.Linear(self.token_dim, embed_dim)
        self.z_proj_ln = LayerNorm(embed_dim)
        self.encoder_pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
        self.encoder_blocks = self._blocks(embed_dim, depth, num_heads, mlp_ratio, attn_dropout, proj_dropout)
        self.encoder_norm = LayerNorm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n, decoder_embed_dim))
        self.decoder_blocks = self._blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
                                           attn_dropout, proj_dropout)
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.diffusion_pos_embed = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))
        self._init_weights()
        # built after the init above: the head has its own (zeroed adaLN) initialisation
        self.diffloss = DiffusionMLP(self.token_dim, decoder_embed_dim, diffloss_width, diffloss_depth, learn_sigma)

    @staticmethod
    def _blocks(dim, depth, heads, mlp_ratio, attn_drop, proj_drop) -> nn.ModuleList:
        return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm,
                                   attn_drop=attn_drop, proj_drop=proj_drop) for _ in range(depth))

    def _init_weights(self) -> None:
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed,
                  self.decoder_pos_embed, self.diffusion_pos_embed):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        # MAR: no decay on any DiffLoss-MLP parameter (biases and 1-D ones are excluded by the module anyway)
        return {f"diffloss.{n}" for n, _ in self.diffloss.named_parameters()}

    # -- tokens ----------------------------------------------------------------------------------------------
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> (B, L, token_dim) continuous tokens, scaled by token_scale."""
        if self.tokenizer is None:
            return patchify(x, self.patch_size) * self.token_scale
        with torch.no_grad():
            lat = self.tokenizer.encode(x)
        return lat.flatten(2).transpose(1, 2) * self.token_scale

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens / self.token_scale
        if self.tokenizer is None:
            return unpatchify(tokens, self.patch_size, self.grid, self.input_shape[0])
        lat = tokens.transpose(1, 2).reshape(tokens.shape[0], self.token_dim, *self.grid)
        return self.tokenizer.decode(lat)

    # -- encoder / decoder -----------------------------------------------------------------------------------
    def condition(self, labels: torch.Tensor | None, batch: int, device, drop: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, D) buffer embedding: the class embedding, or fake_latent (no label, unconditional model, or
        dropped with probability `drop` for CFG)."""
        fake = self.fake_latent.expand(batch, -1)
        if labels is None or self.num_classes is None:
            return fake
        emb = self.class_emb(labels.long())
        if drop > 0:
            keep = torch.rand(batch, generator=generator, device="cpu").to(device) >= drop
            emb = torch.where(keep[:, None], emb, fake)
        return emb

    def forward_encoder(self, tokens: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        x = torch.cat([cond[:, None].expand(-1, self.buffer_size, -1), self.z_proj(tokens)], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed)
        full_mask = torch.cat([mask.new_zeros(b, self.buffer_size), mask], dim=1)
        x = x[(1 - full_mask).nonzero(as_tuple=True)].reshape(b, -1, x.shape[-1])  # buffers are never dropped
        for blk in self.encoder_blocks:
            x = blk(x)
        return self.encoder_norm(x)

    def forward_decoder(self, enc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = enc.shape[0]
        x = self.decoder_embed(enc)
        full_mask = torch.cat([mask.new_zeros(b, self.buffer_size), mask], dim=1).bool()
        full = self.mask_token.to(x.dtype).expand(b, full_mask.shape[1], -1).clone()
        full[~full_mask] = x.reshape(-1, x.shape[-1])
        x = full + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, self.buffer_size:]
        return x + self.diffusion_pos_embed

    def sample_mask(self, batch: int, device, generator: torch.Generator | None = None):
        """(orders, mask, ratio): one truncated-normal ratio per batch, ceil(L·ratio) tokens masked per sample."""
        ratio = truncated_normal_ratio(1.0, self.mask_ratio_std, self.mask_ratio_min, 1.0, generator)
        orders = random_orders(batch, self.seq_len, device, generator)
        return orders, mask_by_order(orders, math.ceil(self.seq_len * ratio)), ratio

    # -- contract ---------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        x = batch["x"]
        b = x.shape[0]
        target = self.tokenize(x).detach()
        labels = batch.get(self.class_key) if self.num_classes else None
        cond = self.condition(labels, b, x.device, drop=self.label_drop if self.training else 0.0)
        _, mask, ratio = self.sample_mask(b, x.device)
        z = self.forward_decoder(self.forward_encoder(target, mask, cond), mask)
        # each token replicated diffusion_batch_mul times with its own (t, ε); the mask follows it
        mul = self.diffusion_batch_mul
        x0 = target.reshape(b * self.seq_len, -1).repeat(mul, 1)
        z = z.reshape(b * self.seq_len, -1).repeat(mul, 1)
        mask_rep = mask.reshape(-1).repeat(mul)
        t = torch.randint(0, self.timesteps, (x0.shape[0],), device=x.device)
        eps = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, eps)
        out = self.diffloss(x_t, t, z)
        eps_pred, var_values = (out.chunk(2, dim=-1) if self.learn_sigma else (out, None))
        # Σ m·loss / Σ m (the loss over masked tokens only) as a per-row weight for a plain mean
        weight = mask_rep * (mask_rep.numel() / mask_rep.sum().clamp(min=1))
        outputs = {"eps_pred": eps_pred, "eps": eps, "mask": mask_rep, "loss_weight": weight, "x0": x0,
                   "x_t": x_t, "t": t, "mask_ratio": torch.tensor(ratio, device=x.device)}
        if var_values is not None:
            outputs["var_values"] = var_values
        return outputs

    def encode(self, batch: dict) -> torch.Tensor:
        """Encoder features with mask 0 (every token visible), fake_latent buffers, buffers dropped,
        mean-pooled: the card's probe of "the MAR encoder is semantic"."""
        tokens = self.tokenize(batch["x"])
        b = tokens.shape[0]
        mask = tokens.new_zeros(b, self.seq_len)
        enc = self.forward_encoder(tokens, mask, self.condition(None, b, tokens.device))
        return enc[:, self.buffer_size:].mean(1)

    @torch.no_grad()
    def reconstruct(self, batch: dict) -> torch.Tensor:
        return self.sample(batch["x"].shape[0], batch.get(self.class_key) if self.num_classes else None)

    # -- sampling ----------------------------------------------------------------------------------------------
    def _head(self, x_t, t, z):
        out = self.diffloss(x_t, t, z)
        return out.chunk(2, dim=-1) if self.learn_sigma else (out, None)

    def sample_tokens(self, z: torch.Tensor, cfg: float, steps: int, temperature: float,
                      generator: torch.Generator | None) -> torch.Tensor:
        """Reverse DDPM over `steps` respaced timesteps for N tokens conditioned on z (N, D). With CFG, z is
        [cond; uncond] (2N rows) and ε is guided, the variance taken from the conditional half."""
        guided = cfg != 1.0
        n = z.shape[0] // 2 if guided else z.shape[0]
        dev = z.device
        ac_full = self.schedule.alphas_cumprod.to(dev, torch.float64)
        use = torch.linspace(0, self.timesteps - 1, steps, device=dev).round().long().unique()
        ac = ac_full[use]
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        betas = 1 - ac / ac_prev
        post_var = betas * (1 - ac_prev) / (1 - ac)
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(use) > 1 else torch.log(betas)
        x = torch.randn(n, self.token_dim, generator=generator, device="cpu").to(dev) * temperature
        for i in reversed(range(len(use))):
            xin = torch.cat([x, x]) if guided else x
            t = torch.full((xin.shape[0],), int(use[i]), device=dev)
            eps, v = self._head(xin, t, z)
            if guided:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + cfg * (eps_c - eps_u)
                v = v[:n] if v is not None else None
            eps, x64 = eps.double(), x.double()
            x0 = (x64 - (1 - ac[i]).sqrt() * eps) / ac[i].sqrt()
            if self.clip_x0 is not None:  # 1/sqrt(ᾱ) ~ 2e4 at the cosine top step amplifies any ε error
                x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            mean = (betas[i] * ac_prev[i].sqrt() / (1 - ac[i])) * x0 \
                + ((1 - ac_prev[i]) * (1 - betas[i]).sqrt() / (1 - ac[i])) * x64
            if i == 0:
                x = mean.float()
                break
            if v is not None:  # learned variance: interpolate log β and log β̃ (improved DDPM)
                frac = (v.double() + 1) / 2
                logvar = frac * torch.log(betas[i]) + (1 - frac) * post_logvar[i]
            else:
                logvar = post_logvar[i].expand_as(mean)
            noise = torch.randn(mean.shape, generator=generator, device="cpu", dtype=torch.float64).to(dev)
            x = (mean + (0.5 * logvar).exp() * noise * temperature).float()
        return x

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, guidance: float = 1.0, steps: int = 16,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The generative-model contract: (n, C, H, W) images in [-1, 1]. `steps` masked-AR iterations: each
        predicts the tokens that leave the mask, the masked share following cos(π/2 · (k+1)/steps) along a
        random order per sample; CFG on ε with a linear schedule (1 + (guidance − 1)·unmasked share)."""
        dev = self.fake_latent.device
        if labels is not None and self.num_classes is None:
            raise ValueError("labels given, but this MAR is unconditional (model.conditional=false or no classes)")
        labels = labels.to(dev) if labels is not None else None
        guided = guidance != 1.0 and labels is not None
        cond = self.condition(labels, n, dev)
        if guided:
            cond = torch.cat([cond, self.condition(None, n, dev)])
        length = self.seq_len
        tokens = torch.zeros(n, length, self.token_dim, device=dev)
        mask = torch.ones(n, length, device=dev)
        orders = random_orders(n, length, dev, generator)
        steps = max(1, min(int(steps), length))
        for k in range(steps):
            tok_in, mask_in = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
            z = self.forward_decoder(self.forward_encoder(tok_in, mask_in, cond), mask_in)
            ratio = math.cos(math.pi / 2 * (k + 1) / steps)
            left = int(mask[0].sum())
            num_masked = 0 if k == steps - 1 else max(1, min(left - 1, math.floor(length * ratio)))
            next_mask = mask_by_order(orders, num_masked)
            to_predict = (mask - next_mask).bool()  # leaves the mask this iteration
            zsel = z[torch.cat([to_predict, to_predict])] if guided else z[to_predict]
            cfg = 1.0 + (guidance - 1.0) * (length - num_masked) / length if guided else 1.0
            new = self.sample_tokens(zsel, cfg, self.sample_diffusion_steps, self.temperature, generator)
            tokens[to_predict] = new.to(tokens.dtype)
            mask = next_mask
        return self.detokenize(tokens).clamp(-1, 1)
