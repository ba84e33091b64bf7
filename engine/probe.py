"""Linear probe (every label, and a few per class) and kNN of an encoder against a randomly initialised one."""
from __future__ import annotations

import torch

from sslpt.engine.config import Config, ConfigError
from sslpt.engine.data import build_eval_data
from sslpt.engine.eval import extract_features, few_shot_linear_probe, knn_accuracy, linear_probe
from sslpt.engine.objectives import Objective


def probe_encoder(encoder, data, device, shots: int = 0) -> dict:
    """Accuracies keyed linear_{pool}, knn_{pool} and, with ``shots`` > 0, few_shot_{pool} (pool: cls, mean)."""
    train_x, train_y, val_x, val_y = data
    was_training = encoder.training
    encoder.eval()
    result = {}
    for pool in ("cls", "mean"):
        train_f, val_f = (extract_features(lambda x: encoder.features(x.float(), pool=pool), imgs, batch_size=256,
                                           device=device) for imgs in (train_x, val_x))
        result[f"linear_{pool}"] = linear_probe(train_f, train_y, val_f, val_y)
        result[f"knn_{pool}"] = knn_accuracy(train_f, train_y, val_f, val_y)
        if shots:
            result[f"few_shot_{pool}"] = few_shot_linear_probe(train_f, train_y, val_f, val_y, shots)
    encoder.train(was_training)
    return result


def run_probe(cfg: Config, objective: Objective, device) -> dict:
    """Accuracies of the objective's encoder and of a random one of the same shape, built as the objective
    builds its own (``Objective.random_encoder``, seeded by train.seed + 1), on the held-out split."""
    m, d = cfg.model, cfg.data
    try:
        data = build_eval_data(d.name, path=d.path, img_size=m.img_size, channels=m.in_chans,
                               val_fraction=d.val_fraction, seed=0, synthetic_size=d.synthetic_size,
                               max_images=cfg.train.probe_max_images, max_image_pixels=d.max_image_pixels,
                               decoder=d.decoder)
    except ValueError as err:   # e.g. a flat val/ folder: a one-line message, not a traceback
        raise ConfigError(f"data.path={d.path!r}: {err}") from err
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 1)
        random_encoder = type(objective).random_encoder(cfg.objective, cfg.model).to(device)
    # a small labelled folder may lack `shots` train images of some class: that probe is then left out
    shots = cfg.train.probe_shots if int(data[1].bincount().min()) >= cfg.train.probe_shots else 0
    pretrained = probe_encoder(objective.encoder, data, device, shots)
    random = probe_encoder(random_encoder, data, device, shots)
    out = {f"{k}_{who}": v for who, res in (("pretrained", pretrained), ("random", random)) for k, v in res.items()}
    protocol = {
        "features": "frozen encoder in eval mode, full images without augmentation; a ViT: after its final "
                    "LayerNorm, the cls token (cls) and the mean of the patch tokens (mean); a ResNet: its "
                    "globally pooled last stage under both names",
        "linear": "L-BFGS multinomial logistic regression on every train label (weight decay 1e-4, 200 iterations)",
        "few_shot": f"the same probe fitted on {shots} labels per class, mean accuracy over 20 class-balanced "
                    f"draws (the same draws for both encoders)" if shots else "off",
        "knn": "k=20 nearest neighbours by cosine similarity, votes weighted by exp(similarity / 0.07)",
        "random": f"an untrained encoder of the same shape, built as the objective builds its own, seed "
                  f"train.seed + 1 = {cfg.train.seed + 1}",
        "split": f"held-out fraction data.val_fraction = {d.val_fraction} of {d.name}, split with seed 0",
        "values": "accuracy in [0, 1] on the held-out split: <probe>_<pool>_<pretrained|random>",
    }
    return {**out, "train_images": len(data[0]), "val_images": len(data[2]), "shots": shots,
            "objective": cfg.objective.name, "seed": cfg.train.seed, "protocol": protocol}
