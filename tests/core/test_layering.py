"""Imports point one way: each package of nanovllm imports only packages below it, so the engine core never
imports a mode (modes sit above engine), and no two packages import each other."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Lowest first; a module may import its own package and those before it.
LAYERS = ["utils", "partitions", "kernels", "attention", "layers", "models", "config", "sampling_params", "tools",
          "engine", "modes", "llm"]


def imported_packages(path: Path) -> set[str]:
    """The nanovllm packages (second component of the module name) a file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nanovllm":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("nanovllm.")}
    return found


def test_every_package_imports_only_those_below_it():
    upward = []
    for path in sorted((ROOT / "nanovllm").rglob("*.py")):
        parts = path.relative_to(ROOT / "nanovllm").with_suffix("").parts
        if parts == ("__init__",):
            continue  # the package's public names: LLM, SamplingParams
        package = parts[0]
        assert package in LAYERS, f"{path}: package {package!r} has no place in LAYERS"
        for imported in imported_packages(path):
            if LAYERS.index(imported) > LAYERS.index(package):
                upward.append(f"{path.relative_to(ROOT)} imports nanovllm.{imported}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)

