"""``hf-flexattn`` command line: ``--version``, ``info``, ``bench``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any


def _info() -> dict[str, Any]:
    import torch

    import hf_flexattn
    from hf_flexattn.api import resolve_backend

    info: dict[str, Any] = {
        "hf_flexattn": hf_flexattn.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("triton", "transformers", "accelerate", "datasets"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - report what is missing, never crash
            info[mod] = None
    cuda = torch.cuda.is_available()
    info["cuda"] = cuda
    if cuda:
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    device = torch.device("cuda" if cuda else "cpu")
    info["device_type"] = device.type
    try:
        info["backend"] = resolve_backend(device)
    except ValueError as err:
        info["backend"] = f"error: {err}"
    return info


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-flexattn`` console script."""
    import hf_flexattn

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark's parser
        from hf_flexattn import bench

        return bench.main(argv[1:])
    if argv[:1] == ["bench-e2e"]:
        from hf_flexattn import bench_e2e

        return bench_e2e.main(argv[1:])
    parser = argparse.ArgumentParser(prog="hf-flexattn", description=__doc__)
    parser.add_argument("--version", action="version",
                        version=f"hf-flexattn {hf_flexattn.__version__}")
    sub = parser.add_subparsers(dest="cmd")
    p_info = sub.add_parser("info", help="versions, device and the backend that auto picks")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("bench", help="benchmark kernels: `hf-flexattn bench --help`")
    sub.add_parser("bench-e2e", help="training step + generate: `hf-flexattn bench-e2e --help`")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        info = _info()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            width = max(map(len, info))
            for k, v in info.items():
                print(f"{k:<{width}}  {v}")
        return 0
    parser.print_help(sys.stderr)
    return 2
