"""A Griffe extension for the API reference: ddiff's docstrings use Sphinx roles
(:func:`ddiff.sample_keys`, :class:`~ddiff.RecipeError`) and reST literal blocks (``::``),
which Markdown would print as they are. This turns a role into a cross-reference when its
target is a name of a public ``__all__`` (``ddiff``, ``ddiff.capabilities``,
``ddiff.testing``, ``ddiff.runner``), or into inline code otherwise, and a paragraph that
ends in ``::`` into one that ends in ``:`` (the indented block after it is already code).
"""

import ast
import re
from pathlib import Path

import griffe

PUBLIC_MODULES = {
    "ddiff": "ddiff/__init__.py",
    "ddiff.capabilities": "ddiff/capabilities.py",
    "ddiff.testing": "ddiff/testing/__init__.py",
    "ddiff.runner": "ddiff/runner/__init__.py",
}
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([\w.]+)`")
LITERAL_BLOCK = re.compile(r"(?<=\S)::$", re.MULTILINE)


def public_names(root: Path) -> dict[str, str]:
    """Documented identifier by identifier and by short name (short names that two public
    modules share are left out)."""
    documented: dict[str, str] = {module: module for module in PUBLIC_MODULES}
    short: dict[str, list[str]] = {}
    for module, path in PUBLIC_MODULES.items():
        tree = ast.parse((root / path).read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
            ):
                for name in ast.literal_eval(node.value):
                    if shadowed_by_submodule(root / path, name):
                        continue
                    identifier = f"{module}.{name}"
                    documented[identifier] = identifier
                    short.setdefault(name, []).append(identifier)
    for name, identifiers in short.items():
        if len(identifiers) == 1:
            documented.setdefault(name, identifiers[0])
    return documented


def shadowed_by_submodule(init: Path, name: str) -> bool:
    """Whether ``name`` is also a submodule of the package ``init`` belongs to (Griffe then
    documents the submodule under that name, as for ``ddiff.runner.diagnose``)."""
    folder = init.parent
    return init.name == "__init__.py" and (
        (folder / f"{name}.py").exists() or (folder / name).is_dir()
    )


def target(path: str, documented: dict[str, str]) -> str | None:
    """The documented identifier a role's target refers to: itself, or the documented
    object that holds it (``Setup.sampler_cases`` -> ``ddiff.testing.Setup``)."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        found = documented.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring's Sphinx roles and reST literal-block markers."""

    def __init__(self) -> None:
        self.documented = public_names(Path(__file__).resolve().parent.parent)

    def rewrite(self, text: str) -> str:
        def role(match: re.Match) -> str:
            short, path = match.group(1), match.group(2)
            shown = path.rsplit(".", 1)[-1] if short else path
            identifier = target(path, self.documented)
            return f"[`{shown}`][{identifier}]" if identifier else f"`{shown}`"

        return LITERAL_BLOCK.sub(":", ROLE.sub(role, text))

    def on_instance(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = self.rewrite(obj.docstring.value)
