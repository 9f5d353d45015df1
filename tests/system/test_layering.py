"""The package layering, read from the source with ``ast`` (nothing is imported or run).

* ``agent/common`` (the shared ground) imports nothing else of ``agent``;
* ``agent/protocol`` (the wire contract) imports only itself and ``agent.common``;
* ``cloud_sync`` imports from ``agent`` only the contract, the common ground and the few
  modules in ``CLOUD_USES_DEVICE_CODE``, each with the reason it runs device code;
* ``agent`` never imports ``cloud_sync``, and no two top-level parts (``agent.update``,
  ``agent.config``, ``cloud_sync.registry``, …) import each other, even in a function body.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "cloud_sync")

# agent module → (cloud_sync files or folders that may import it, why it is device code there)
CLOUD_USES_DEVICE_CODE: dict[str, tuple[tuple[str, ...], str]] = {
    "agent.cli": (
        ("cloud_sync/cli.py",),
        "the combined CLI hands `edgefleet agent …` to the agent's own dispatch",
    ),
    "agent.config": (
        ("cloud_sync/demo.py", "cloud_sync/rollout/configdoc.py"),
        "the demo runs a real agent from a config; `rollout start --config` checks the "
        "[[pipelines]] tables with the device's own models (AgentConfig, PipelineConfig and "
        "their cross-checks) so a configuration devices would refuse is never published",
    ),
    "agent.service": (("cloud_sync/demo.py",), "the demo runs a real agent"),
    "agent.pipeline.sinks": (("cloud_sync/demo.py",), "the demo watches the agent's events"),
    "agent.pipeline.synthetic": (("cloud_sync/demo.py",), "the demo's camera is a synthetic video"),
    "agent.pipeline.preprocess": (
        ("cloud_sync/registry/",),
        "publish computes golden outputs and the input contract exactly as the device will",
    ),
    "agent.update.transfer.client": (
        ("cloud_sync/clips.py",),
        "`edgefleet clip get` fetches a device's clip with the same chunk client the device "
        "uses for models, pointed at the clip topics (one implementation of the protocol)",
    ),
    "agent.update.transfer.errors": (
        ("cloud_sync/clips.py",),
        "the chunk client's errors, to tell a missing clip from a timeout",
    ),
    "agent.pipeline.postprocess": (
        ("cloud_sync/registry/",),
        "publish computes golden outputs exactly as the device will",
    ),
}


def module_name(path: Path) -> str:
    """``agent/update/store.py`` → ``agent.update.store``; a package's ``__init__`` → its name."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def imports_of(source: str, importer: str, is_package: bool = False) -> set[str]:
    """Every project module ``source`` imports, at module level or in a function body.

    ``from a.b import c`` counts as ``a.b.c`` when that is a module, else as ``a.b``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = importer.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if is_module(full) else base)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def project_imports() -> dict[str, tuple[str, set[str]]]:
    """Module → (its file relative to the repository, the project modules it imports)."""
    out: dict[str, tuple[str, set[str]]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = module_name(path)
            rel = path.relative_to(ROOT).as_posix()
            source = path.read_text(encoding="utf-8")
            out[name] = (rel, imports_of(source, name, path.name == "__init__.py"))
    return out


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def layering_violations(graph: Mapping[str, tuple[str, set[str]]]) -> list[str]:
    """One line per import that breaks the layering."""
    bad: list[str] = []
    for name, (rel, imported) in sorted(graph.items()):
        for dep in sorted(imported):
            if (
                within(name, "agent.common")
                and within(dep, "agent")
                and not within(dep, "agent.common")
            ):
                bad.append(f"{rel}: agent/common imports {dep}")
            elif (
                within(name, "agent.protocol")
                and within(dep, "agent")
                and not within(dep, "agent.protocol", "agent.common")
            ):
                bad.append(f"{rel}: agent/protocol imports {dep}")
            elif within(name, "agent") and within(dep, "cloud_sync"):
                bad.append(f"{rel}: agent imports {dep} (the device never runs cloud code)")
            elif within(name, "cloud_sync") and within(dep, "agent"):
                if within(dep, "agent.protocol", "agent.common"):
                    continue
                allowed = CLOUD_USES_DEVICE_CODE.get(dep)
                if allowed is None or not any(rel.startswith(p) for p in allowed[0]):
                    bad.append(
                        f"{rel}: cloud_sync imports {dep}; use agent.protocol or agent.common,"
                        " or add it to CLOUD_USES_DEVICE_CODE with the reason"
                    )
    return bad


def part_of(module: str) -> str:
    """The top-level part a module belongs to: ``agent.update.store`` → ``agent.update``."""
    return ".".join(module.split(".")[:2])


def part_cycles(graph: Mapping[str, tuple[str, set[str]]]) -> list[list[str]]:
    """The groups of top-level parts that import each other (strongly connected, size > 1)."""
    edges: dict[str, set[str]] = {}
    for name, (_rel, imported) in graph.items():
        src = part_of(name)
        edges.setdefault(src, set()).update(
            part_of(d) for d in imported if part_of(d) != src and part_of(d) not in PACKAGES
        )
    return [sorted(c) for c in _strongly_connected(edges) if len(c) > 1]


def _strongly_connected(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(edges.get(start, ())))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                out.append(comp)
    return out


def test_layering() -> None:
    graph = project_imports()
    assert "agent.common.errors" in graph and "cloud_sync.deploy" in graph  # the walk found them
    assert layering_violations(graph) == []


def test_no_import_cycles_between_top_level_parts() -> None:
    assert part_cycles(project_imports()) == []


def test_every_allowed_device_import_is_still_used() -> None:
    """An entry of CLOUD_USES_DEVICE_CODE nobody needs any more is a door left open."""
    used = {d for _rel, imported in project_imports().values() for d in imported}
    assert sorted(set(CLOUD_USES_DEVICE_CODE) - used) == []


def test_the_checks_catch_violations() -> None:
    """The rules on a made-up graph: each kind of violation is reported."""
    fake = {
        "agent.common.x": ("agent/common/x.py", {"agent.config"}),
        "agent.protocol.y": ("agent/protocol/y.py", {"agent.common.errors", "agent.update.store"}),
        "agent.update.z": ("agent/update/z.py", {"cloud_sync.deploy"}),
        "cloud_sync.deploy": ("cloud_sync/deploy.py", {"agent.service", "agent.protocol.wire"}),
        "cloud_sync.demo": ("cloud_sync/demo.py", {"agent.service"}),
    }
    assert layering_violations(fake) == [
        "agent/common/x.py: agent/common imports agent.config",
        "agent/protocol/y.py: agent/protocol imports agent.update.store",
        "agent/update/z.py: agent imports cloud_sync.deploy (the device never runs cloud code)",
        "cloud_sync/deploy.py: cloud_sync imports agent.service; use agent.protocol or"
        " agent.common, or add it to CLOUD_USES_DEVICE_CODE with the reason",
    ]
    cyclic = {
        "agent.update.a": ("", {"agent.sync.b"}),
        "agent.sync.b": ("", {"agent.update.c"}),
        "agent.config": ("", {"agent.common.errors"}),
    }
    assert part_cycles(cyclic) == [["agent.sync", "agent.update"]]
    assert imports_of(
        "def f():\n    from agent.protocol import wire\n    import cloud_sync.deploy\n",
        "agent.x",
    ) == {"agent.protocol.wire", "cloud_sync.deploy"}
