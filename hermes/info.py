"""``python -m hermes.info``: print what this installation can run."""

from __future__ import annotations

import json
import sys


def format_capabilities(info: dict) -> str:
    """Human-readable multi-line summary of :func:`hermes.ops.capabilities`."""
    lines = [
        f"hermes {info['hermes_version']} (torch {info['torch_version']})",
        f"native extension : {'loaded' if info['extension_loaded'] else 'NOT loaded'}"
        + (f" ({info['extension_path']})" if info["extension_loaded"] else ""),
    ]
    if not info["extension_loaded"]:
        lines.append(f"  reason         : {info['extension_error']}")
    lines.append(
        f"OpenMP           : {'yes' if info['openmp'] else 'no'}, {info['openmp_threads']} threads"
    )
    if info["cuda_compiled"]:
        archs = ", ".join(info["cuda_archs"])
        lines.append(
            f"CUDA kernels     : compiled for {archs} (runtime {info['cuda_runtime_version']})"
        )
        if info["cuda_device_count"]:
            lines.append(f"CUDA devices now : {', '.join(info['cuda_devices'])}")
        else:
            why = info["cuda_error"]
            if "insufficient" in str(why).lower() and not info["torch_cuda_available"]:
                why += "; or no NVIDIA driver or GPU at all (torch sees none either)"
            lines.append(f"CUDA devices now : none ({why})")
    else:
        lines.append("CUDA kernels     : not compiled")
    lines.append(f"torch CUDA       : {'available' if info['torch_cuda_available'] else 'no'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from hermes.ops import capabilities

    argv = sys.argv[1:] if argv is None else argv
    info = capabilities()
    print(json.dumps(info, indent=2) if "--json" in argv else format_capabilities(info))
    sys.stdout.flush()  # a closed pipe raises here, where `hermes.cli.main` catches it
    return 0


if __name__ == "__main__":  # through the CLI: its handling of errors and closed pipes
    from hermes.cli import main as cli_main

    raise SystemExit(cli_main(["info", *sys.argv[1:]]))
