"""Print shell exports that make the in-tree packages importable, entry points included,
without installing anything (the GPU machine has no package index).

    eval "$(python3 benchmarks/intree_env.py)"

It writes one synthetic ``*.dist-info`` holding every package's ``flashmla.backends`` entry
points into a temporary folder and puts that folder and each package's ``src`` on PYTHONPATH."""

from __future__ import annotations

import pathlib
import tempfile

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    site = pathlib.Path(tempfile.gettempdir()) / "flashmla-intree"
    dist = site / "flashmla_intree-0.0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flashmla-intree\nVersion: 0.0.0\n")
    lines, paths = ["[flashmla.backends]"], [str(site)]
    for pyproject in sorted(ROOT.glob("packages/*/pyproject.toml")):
        meta = tomllib.loads(pyproject.read_text())["project"]
        for name, target in meta.get("entry-points", {}).get("flashmla.backends", {}).items():
            lines.append(f"{name} = {target}")
        paths.append(str(pyproject.parent / "src"))
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    print(f"export PYTHONPATH={':'.join(paths)}${{PYTHONPATH:+:$PYTHONPATH}}")


if __name__ == "__main__":
    main()
