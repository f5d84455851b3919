"""Our plain-torch DINOv2 ViT-S/14 against transformers' Dinov2Model, with seeded random weights.

The real weights are not obtainable here, so the loader is proven by round-tripping random weights
through both published layouts: the official `dinov2_vits14_pretrain.pth` state dict and the
Hugging Face `facebook/dinov2-small` safetensors (hub key names), then comparing patch tokens on
real images, at the pretraining grid and at a non-square size (interpolated position embeddings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from core.backbones import dinov2
from tests.require import missing

try:
    import transformers
except ImportError:  # a dev dependency: its absence must not pass silently in CI
    transformers = None


@pytest.fixture(autouse=True)
def _needs_transformers() -> None:
    if transformers is None:
        missing("transformers (a dev dependency) is not installed: the DINOv2 parity test cannot run")
from core.errors import WeightsNotFoundError  # noqa: E402

HUB_NAMES = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
             "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense."}


def hf_model(registers: bool):
    torch.manual_seed(1234)
    kw = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
              patch_size=14, image_size=518, layerscale_value=1.0)
    if registers:
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=4,
                                                                                              **kw))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    with torch.no_grad():  # make every parameter non-trivial (layer scales, norms, biases, tokens)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] == 384 else 0.0) * 0.5)
    return model.eval()


def hub_layout(model) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        for new, old in HUB_NAMES.items():
            k = k.replace(new, old)
        out[k] = v.contiguous()
    return out


def official_layout(model) -> dict[str, torch.Tensor]:
    """Independent inverse of the HF conversion: what facebookresearch/dinov2 saves."""
    sd = model.state_dict()
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "mask_token": sd["embeddings.mask_token"].reshape(1, 384),
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd["embeddings.register_tokens"]
    for i in range(12):
        h, o = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[o + f"attn.qkv.{kind}"] = torch.cat([sd[h + f"attention.{p}_proj.{kind}"] for p in "qkv"])
            out[o + f"attn.proj.{kind}"] = sd[h + f"attention.o_proj.{kind}"]
            for n in ("norm1", "norm2"):
                out[o + f"{n}.{kind}"] = sd[h + f"{n}.{kind}"]
            for n in ("fc1", "fc2"):
                out[o + f"mlp.{n}.{kind}"] = sd[h + f"mlp.{n}.{kind}"]
        out[o + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
        out[o + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
    return out


def real_batch(tire: Path, h: int, w: int) -> torch.Tensor:
    files = sorted((tire / "test" / "cut" / "rgb").glob("*.png"))[:2]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    arrs = [(np.asarray(Image.open(f).convert("RGB").resize((w, h)), np.float32) / 255 - mean) / std for f in files]
    return torch.from_numpy(np.stack(arrs).astype(np.float32)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("registers", [False, True], ids=["vits14", "vits14_reg4"])
def test_official_and_hf_layouts_match_transformers(tmp_path: Path, tire: Path, registers: bool) -> None:
    ref = hf_model(registers)
    official = tmp_path / dinov2.OFFICIAL_FILES[registers]
    torch.save(official_layout(ref), official)
    hub = tmp_path / "model.safetensors"
    save_file(hub_layout(ref), str(hub))
    n_reg = 4 if registers else 0
    for h, w in ((224, 224), (14 * 16, 14 * 22)):
        x = real_batch(tire, h, w)
        with torch.no_grad():
            expected = ref(pixel_values=x).last_hidden_state[:, 1 + n_reg :]
            for path in (official, hub):
                ours = dinov2.build_dinov2(path, registers)(x)
                assert ours.shape == expected.shape == (2, (h // 14) * (w // 14), 384)
                torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_weights_discovery_order_and_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsNotFoundError) as exc:
        dinov2.find_weights(None)
    msg = str(exc.value)
    assert "dinov2_vits14_pretrain.pth" in msg and "facebook/dinov2-small" in msg and "model.safetensors" in msg
    snap = tmp_path / "hf" / "hub" / "models--facebook--dinov2-small" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"x")
    assert dinov2.find_weights(None) == snap / "model.safetensors"
    hub = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    assert dinov2.find_weights(None) == hub  # torch hub cache before the HF cache
    configured = tmp_path / "mine.pth"
    configured.write_bytes(b"x")
    assert dinov2.find_weights(configured) == configured  # configured path first


def test_auto_backbone_falls_back_to_efficientnet(tmp_path: Path, monkeypatch) -> None:
    from core.backbones import resolve_backbone_name

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert resolve_backbone_name("auto", None) == "efficientnet_lite0"
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert resolve_backbone_name("auto", str(weights)) == "dinov2_vits14"
