import numpy as np
import torch

from sslpt import kernels
from sslpt.engine.config import ModelConfig
from sslpt.engine.models.mae import MaskedAutoencoder
from sslpt.engine.models.vit import VisionTransformer, sincos_pos_embed
from sslpt.engine.optim import lr_at, param_groups

TINY = ModelConfig(arch="vit_tiny", img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                   decoder_dim=16, decoder_depth=1, decoder_heads=2)


def mae_numpy_pos_embed(dim, grid):
    """MAE's util/pos_embed.py, re-derived in numpy from its definition."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # xy indexing
    emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_sincos_matches_mae():
    for dim, grid in [(16, 3), (768, 14), (128, 4)]:
        ours = sincos_pos_embed(dim, grid)[0].double().numpy()
        np.testing.assert_allclose(ours, mae_numpy_pos_embed(dim, grid), atol=1e-6)


def test_visible_path_equals_full_path_on_kept_tokens():
    """With no attention between tokens differing, embed-visible == embed-all-then-gather."""
    vit = VisionTransformer(8, 2, 1, 32, 0, 2)
    imgs = torch.randn(3, 1, 8, 8)
    masking = kernels.random_masking(3, 16, 0.75)
    full = vit.embed(imgs)
    visible = vit.embed(imgs, masking.ids_keep)
    torch.testing.assert_close(visible, kernels.gather_tokens(full, masking.ids_keep))


def test_mae_init():
    model = MaskedAutoencoder(TINY, loss_predictor=True)
    assert not any(n.endswith("pos_embed") for n, _ in model.named_parameters())  # frozen: buffers
    assert torch.all(model.encoder.blocks[0].attn.qkv.bias == 0)
    assert abs(model.mask_token.std().item() - 0.02) < 0.015
    # the predictor is an independent copy of the decoder architecture
    assert sum(p.numel() for p in model.decoder.parameters()) == sum(p.numel() for p in model.loss_predictor.parameters())


def test_hpm_gradient_flow():
    """The loss-prediction gradient reaches the encoder, decoder_embed and mask token, not the reconstructor."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(TINY, loss_predictor=True)
    imgs = torch.randn(2, 1, 8, 8)
    masking = kernels.random_masking(2, 16, 0.75)
    h = model.decoder_input(model.encode(imgs, masking.ids_keep), masking.ids_keep)
    model.predict_loss(h).pow(2).sum().backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    for module in (model.encoder.blocks[0], model.decoder_embed, model.loss_predictor):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert model.mask_token.grad.abs().sum() > 0


def test_weight_decay_groups_follow_mae():
    model = MaskedAutoencoder(TINY)
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "mask_token" in decayed and "encoder.cls_token" in decayed     # 1x1xD tokens are decayed in MAE
    assert "encoder.norm.weight" in skipped and "decoder_embed.bias" in skipped
    assert "encoder.blocks.0.attn.qkv.weight" in decayed


def test_lr_schedule():
    assert lr_at(0, 1.0, 0.0, 40, 800) == 0.0
    assert lr_at(20, 1.0, 0.0, 40, 800) == 0.5
    assert abs(lr_at(40, 1.0, 0.0, 40, 800) - 1.0) < 1e-12
    assert abs(lr_at(420, 1.0, 0.0, 40, 800) - 0.5) < 1e-12
    assert abs(lr_at(800, 1.0, 0.1, 40, 800) - 0.1) < 1e-12
