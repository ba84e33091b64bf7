"""Linear probe and kNN of an encoder against a randomly initialised one of the same shape."""
from __future__ import annotations

import torch

from engine.config import Config
from engine.data import build_eval_data
from engine.eval import extract_features, knn_accuracy, linear_probe
from engine.models.mae import MaskedAutoencoder


def probe_encoder(encoder, data, device) -> dict:
    train_x, train_y, val_x, val_y = data
    was_training = encoder.training
    encoder.eval()
    feats = [extract_features(lambda x: encoder.features(x.float()), imgs, batch_size=256, device=device)
             for imgs in (train_x, val_x)]
    encoder.train(was_training)
    return {"linear": linear_probe(feats[0], train_y, feats[1], val_y),
            "knn": knn_accuracy(feats[0], train_y, feats[1], val_y)}


def run_probe(cfg: Config, encoder, device) -> dict:
    """Accuracies of ``encoder`` and of a random encoder (seeded by train.seed) on the held-out split."""
    m, d = cfg.model, cfg.data
    data = build_eval_data(d.name, path=d.path, img_size=m.img_size, channels=m.in_chans,
                           val_fraction=d.val_fraction, seed=0, synthetic_size=d.synthetic_size,
                           max_images=cfg.train.probe_max_images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 1)
        random_encoder = MaskedAutoencoder(cfg.model).encoder.to(device)
    pretrained = probe_encoder(encoder, data, device)
    random = probe_encoder(random_encoder, data, device)
    return {"linear_pretrained": pretrained["linear"], "linear_random": random["linear"],
            "knn_pretrained": pretrained["knn"], "knn_random": random["knn"],
            "train_images": len(data[0]), "val_images": len(data[2])}
