"""DINOv2 ViT-S/14 (optionally with 4 registers) in plain torch, loading official and HF weights."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import WeightsNotFoundError

OFFICIAL_FILES = {False: "dinov2_vits14_pretrain.pth", True: "dinov2_vits14_reg4_pretrain.pth"}
HF_REPOS = {False: "facebook/dinov2-small", True: "facebook/dinov2-with-registers-small"}
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/{stem}/{file}"


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2ViT(nn.Module):
    """ViT-S/14 as in facebookresearch/dinov2; state-dict names follow the official checkpoint."""

    def __init__(
        self, dim: int = 384, depth: int = 12, heads: int = 6, patch: int = 14, registers: int = 0,
        pretrain_size: int = 518,
    ) -> None:
        super().__init__()
        self.patch = patch
        self.num_registers = registers
        n_pos = (pretrain_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.patch_embed = PatchEmbed(patch, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, 4) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.pos_embed
        n = pos.shape[1] - 1
        side = int(math.sqrt(n))
        if gh == side and gw == side:
            return pos
        patch_pos = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        # the register models were trained with an anti-aliased resize of the position grid
        patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bicubic", align_corners=False,
                                  antialias=self.num_registers > 0)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] (sides multiples of 14) -> normalised patch tokens [B, H/14*W/14, dim]."""
        b, _, h, w = x.shape
        gh, gw = h // self.patch, w // self.patch
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1) + self._pos_embed(gh, gw)
        if self.num_registers:
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 1 + self.num_registers :]


def convert_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map Hugging Face Dinov2Model / Dinov2WithRegistersModel names to the official layout.

    Accepts both the hub file names (attention.attention.query ...) and the fused/renamed ones
    of newer transformers releases (attention.q_proj ...).
    """
    out: dict[str, torch.Tensor] = {}
    sd = {k.removeprefix("dinov2.").removeprefix("dinov2_with_registers."): v for k, v in sd.items()}
    simple = dict([  # HF name -> hub name (pairs: tensor names, not credentials, for bandit's B105)
        ("embeddings.cls_token", "cls_token"),
        ("embeddings.mask_token", "mask_token"),
        ("embeddings.position_embeddings", "pos_embed"),
        ("embeddings.register_tokens", "register_tokens"),
        ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
        ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
        ("layernorm.weight", "norm.weight"),
        ("layernorm.bias", "norm.bias"),
    ])
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in simple:
            out[simple[key]] = value.reshape(1, -1) if key == "embeddings.mask_token" else value
            continue
        if not key.startswith("encoder.layer."):
            if key.startswith("pooler"):
                continue
            raise KeyError(f"unexpected key in Hugging Face DINOv2 weights: {key}")
        rest = key[len("encoder.layer."):]
        idx_s, sub = rest.split(".", 1)
        idx = int(idx_s)
        prefix = f"blocks.{idx}."
        for names, part in (
            (("attention.attention.query.", "attention.q_proj."), "q"),
            (("attention.attention.key.", "attention.k_proj."), "k"),
            (("attention.attention.value.", "attention.v_proj."), "v"),
        ):
            hit = next((n for n in names if sub.startswith(n)), None)
            if hit:
                qkv.setdefault(idx, {})[part + sub[len(hit):]] = value
                break
        else:
            mapping = {
                "attention.output.dense.": "attn.proj.",
                "attention.o_proj.": "attn.proj.",
                "layer_scale1.lambda1": "ls1.gamma",
                "layer_scale2.lambda1": "ls2.gamma",
                "norm1.": "norm1.",
                "norm2.": "norm2.",
                "mlp.fc1.": "mlp.fc1.",
                "mlp.fc2.": "mlp.fc2.",
            }
            src = next((m for m in mapping if sub.startswith(m)), None)
            if src is None:
                raise KeyError(f"unexpected key in Hugging Face DINOv2 weights: {key}")
            out[prefix + mapping[src] + sub[len(src):]] = value
    for idx, parts in qkv.items():
        for kind in ("weight", "bias"):
            out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts[f"q{kind}"], parts[f"k{kind}"], parts[f"v{kind}"]])
    return out


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Official .pth (plain or wrapped in 'model'/'teacher') or HF .safetensors, in official names."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if path.suffix == ".safetensors" or (head[8:9] == b"{" and not head.startswith(b"PK")):
        from safetensors.torch import load_file

        return convert_hf_state_dict(load_file(str(path)))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "teacher", "state_dict"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if any(k.startswith(("embeddings.", "encoder.", "dinov2.")) for k in sd):
        return convert_hf_state_dict(sd)
    return {k.removeprefix("backbone."): v for k, v in sd.items()}


def _hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(hf_home / "hub")
    return dirs


def find_weights(configured: str | os.PathLike | None, registers: bool = False, allow_download: bool = False) -> Path:
    """Find DINOv2 ViT-S/14 weights: configured path, torch hub cache, HF cache, (download if allowed)."""
    official = OFFICIAL_FILES[registers]
    repo = HF_REPOS[registers]
    tried: list[str] = []
    if configured:
        p = Path(configured).expanduser()
        if p.is_file():
            return p
        tried.append(f"configured path {p} (missing)")
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / official
    if hub_file.is_file():
        return hub_file
    tried.append(str(hub_file))
    repo_dir = "models--" + repo.replace("/", "--")
    for cache in _hf_cache_dirs():
        snaps = sorted((cache / repo_dir / "snapshots").glob("*/model.safetensors"))
        if snaps:
            return snaps[-1]
        tried.append(str(cache / repo_dir / "snapshots/<rev>/model.safetensors"))
    if allow_download:
        stem = "dinov2_vits14"
        url = OFFICIAL_URL.format(stem=stem, file=official)
        torch.hub.download_url_to_file(url, str(hub_file), progress=True)
        return hub_file
    raise WeightsNotFoundError(
        f"DINOv2 ViT-S/14 weights not found. Put the official '{official}' in {hub_file.parent} "
        f"or set backbone.weights to its path, or place the Hugging Face '{repo}' 'model.safetensors' "
        f"in the HF cache (or set backbone.weights to it). Looked at: {'; '.join(tried)}. "
        "Set backbone.allow_download: true on a machine with internet, or use backbone.name: efficientnet_lite0."
    )


def build_dinov2(weights: Path | None, registers: bool = False) -> DinoV2ViT:
    model = DinoV2ViT(registers=4 if registers else 0)
    if weights is not None:
        sd = load_state_dict_file(weights)
        model.load_state_dict(sd, strict=True)
    return model.eval()
