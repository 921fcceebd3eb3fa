"""MkDocs hooks: the pages that must not drift from the code, and links to the repository's own files.

At build time this writes
- `cli-reference.md` by walking the typer app `lorawatch.cli.app` (every command, argument and option, with its
  default and help text), and `config-reference.md` by walking the pydantic models of `lorawatch.config` (every
  section and field, with its type, default, constraints and description). Both are introspected, never listed,
  so a new command or field appears without editing this file;
- `index.md` from the README, so that the front door of the repository and of the site are one text;
- a copy of every repository file outside docs/ that a page links to (a study file, a bench script), under
  `repo/`, so that such links resolve on the site and strict mode still fails on a link to a missing file.
"""

from __future__ import annotations

import enum
import inspect
import json
import posixpath
import re
import types
import typing
from pathlib import Path

from mkdocs.structure.files import File, Files

REPO_FOLDER = "repo"  # where repository files outside docs/ appear on the site
CLI_PAGE = "cli-reference.md"
CONFIG_PAGE = "config-reference.md"
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


# --- Markdown helpers -------------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    """Plain help text as one Markdown table cell: no line breaks, no HTML, no stray emphasis or column."""
    text = " ".join(str(text).split())
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
            .replace("*", "\\*"))


def _code(value: object) -> str:
    try:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    except TypeError:  # a Path, an enum member of another kind: as the command line would print it
        text = str(value)
    return "`" + text.replace("|", "\\|") + "`" if text else "`\"\"`"


def _paragraphs(text: str | None) -> str:
    """A docstring as Markdown paragraphs, its own line breaks dropped and angle brackets kept visible."""
    if not text:
        return ""
    blocks = [" ".join(block.split()) for block in inspect.cleandoc(text).split("\n\n")]
    return "\n\n".join(b.replace("<", "&lt;").replace(">", "&gt;") for b in blocks if b)


# --- The command line -------------------------------------------------------------------------------------------

def _is_argument(param) -> bool:
    return getattr(param, "param_type_name", "") == "argument" or "Argument" in type(param).__name__


def _param_type(param) -> str:
    descriptor = getattr(param, "type_descriptor", None)  # typer >= 0.20 keeps the annotation here
    if descriptor is not None:
        return _type_name(descriptor.annotation)
    kind = getattr(param, "type", None)
    return getattr(kind, "name", str(kind)) if kind is not None else ""


def _usage(path: str, command) -> str:
    parts = [path]
    if getattr(command, "commands", None):
        parts.append("COMMAND [ARGS]...")
    if any(not _is_argument(p) for p in command.params):
        parts.append("[OPTIONS]")
    for param in command.params:
        if _is_argument(param):
            name = param.name.upper() + ("..." if param.nargs == -1 else "")
            parts.append(name if param.required else f"[{name}]")
    return " ".join(parts)


def _param_row(param) -> str:
    if _is_argument(param):
        name = f"`{param.name.upper()}`" + (" (one or more)" if param.nargs == -1 else "")
    else:
        name = " / ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
        if param.multiple:
            name += " (repeatable)"
    flag = getattr(param, "is_flag", False)
    kind = "flag" if flag else _param_type(param)
    if param.required:
        default = "required"
    elif (param.default is None or (param.multiple and not param.default)
          or "UNSET" in repr(param.default) or "Sentinel" in type(param.default).__name__):  # click >= 8.2: no default
        default = "—"
    else:
        default = _code(param.default.value if isinstance(param.default, enum.Enum) else param.default)
    return f"| {name} | {_cell(kind)} | {default} | {_cell(getattr(param, 'help', '') or '')} |"


def _commands(group, path: str):
    """(path, command) for the group's commands, depth first, in the order the app declares them."""
    for name, command in getattr(group, "commands", {}).items():
        if getattr(command, "hidden", False):
            continue
        yield f"{path} {name}", command
        yield from _commands(command, f"{path} {name}")


def cli_commands(app) -> list[str]:
    """Every command path of a typer app, e.g. ['lorawatch run', ..., 'lorawatch data fetch']."""
    import typer.main

    return [path for path, _ in _commands(typer.main.get_command(app), "lorawatch")]


def cli_reference(app) -> str:
    import typer.main

    root = typer.main.get_command(app)
    commands = list(_commands(root, "lorawatch"))
    lines = ["# Command-line reference", "",
             "<!-- Generated at build time from the typer app lorawatch.cli.app (docs/hooks/reference.py). -->", "",
             _paragraphs(root.help), "",
             "Every command prints its own help with `--help`; this page is generated from the same definitions "
             "when the site is built. A user's mistake ends a command with exit code 2 and one line naming what "
             "was wrong ([Bad input](bad-input.md)).", "",
             "| command | what it does |", "|---|---|"]
    for path, command in commands:
        summary = _paragraphs(command.help).split("\n\n")[0] if command.help else ""
        anchor = path.replace(" ", "-")
        lines.append(f"| [`{path}`](#{anchor}) | {_cell(summary)} |")
    for path, command in commands:
        depth = "#" * min(path.count(" ") + 1, 4)
        lines += ["", f"{depth} `{path}` {{#{path.replace(' ', '-')}}}", "", _paragraphs(command.help), "",
                  "```text", _usage(path, command), "```"]
        if getattr(command, "commands", None):
            lines += ["", "Commands: " + ", ".join(f"[`{sub}`](#{(path + ' ' + sub).replace(' ', '-')})"
                                                   for sub in command.commands)]
        if command.params:
            lines += ["", "| argument or option | type | default | description |", "|---|---|---|---|"]
            lines += [_param_row(param) for param in command.params]
    return "\n".join(lines) + "\n"


# --- The config -------------------------------------------------------------------------------------------------

def _is_model(annotation) -> bool:
    from pydantic import BaseModel

    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _strip_annotated(annotation):
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _type_name(annotation) -> str:
    annotation = _strip_annotated(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(_code(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(names)) + (" or null" if type(None) in args else "")
    if origin in (list, tuple, set, frozenset):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or annotation is dict:
        return "mapping"
    if _is_model(annotation):
        return "section"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(_code(m.value) for m in annotation)
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _constraints(info) -> list[str]:
    symbols = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥", "max_length": "length ≤",
               "multiple_of": "multiple of"}
    found = []
    items = []  # list[Annotated[int, Field(ge=0)]]: the items' own constraints
    for arg in typing.get_args(info.annotation):
        if typing.get_origin(arg) is typing.Annotated:
            items += [m for a in typing.get_args(arg)[1:] for m in getattr(a, "metadata", [a])]
    for prefix, metadata in (("", info.metadata), ("each ", items)):
        for item in metadata:
            for attr, symbol in symbols.items():
                value = getattr(item, attr, None)
                if value is not None:
                    found.append(f"{prefix}{symbol} {value}")
    return list(dict.fromkeys(found))


def _models_in(annotation) -> list:
    """The pydantic models an annotation holds: itself, the members of a union, the items of a list."""
    annotation = _strip_annotated(annotation)
    if _is_model(annotation):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _variant(model) -> str:
    """How a member of a union of sections is told apart: its one-value Literal field (a discriminator), else its
    class name."""
    for name, info in model.model_fields.items():
        args = typing.get_args(_strip_annotated(info.annotation))
        if typing.get_origin(_strip_annotated(info.annotation)) is typing.Literal and len(args) == 1:
            return f"{name}: {args[0]}"
    return model.__name__


def _default(info) -> str:
    from pydantic_core import PydanticUndefined

    if info.is_required():
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if value is PydanticUndefined or value is None:
        return "—"
    if _is_model(type(value)):
        return "its fields' defaults"
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return _code(value.value if isinstance(value, enum.Enum) else value)


def _anchor(dotted: str) -> str:
    return "config-" + re.sub(r"[^a-z0-9]+", "-", dotted.lower()).strip("-")


def _model_sections(model, dotted: str, depth: int, seen: set) -> list[str]:
    lines = []
    heading = "#" * min(depth, 6)
    title = f"`{dotted}`" if dotted else "Top level"
    lines += ["", f"{heading} {title} {{#{_anchor(dotted or 'top')}}}", ""]
    own_doc = model.__doc__ if model.__doc__ and model.__doc__ != inspect.getdoc(model.__mro__[1]) else None
    if own_doc and "pydantic" not in own_doc.lower():
        lines += [_paragraphs(own_doc), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    nested = []
    for name, info in model.model_fields.items():
        path = f"{dotted}.{name}" if dotted else name
        kinds = _type_name(info.annotation)
        models = [m for m in _models_in(info.annotation) if m not in seen]
        many = typing.get_origin(_strip_annotated(info.annotation)) in (list, tuple)
        if models:
            label = f"{path}[]" if many else path
            links = ", ".join(f"[`{label}`](#{_anchor(label)})" if len(models) == 1 else
                              f"[`{label}` ({_variant(m)})](#{_anchor(label + '-' + m.__name__)})" for m in models)
            kinds = ("list of " if many else "") + "section " + links + (" or null" if "null" in kinds else "")
            nested += [(label, m, len(models) > 1) for m in models]
        notes = [info.description] if info.description else []
        limits = _constraints(info)
        if limits:
            notes.append("(" + ", ".join(limits) + ")")
        lines.append(f"| `{name}` | {kinds} | {_default(info)} | {_cell(' '.join(notes))} |")
    for label, nested_model, variant in nested:
        seen.add(nested_model)
        name = f"{label}-{nested_model.__name__}" if variant else label
        section = _model_sections(nested_model, label, depth + 1, seen)
        if variant:  # a union of sections: one heading per member, told apart by its class
            section[1] = f"{'#' * min(depth + 1, 6)} `{label}` ({_variant(nested_model)}) {{#{_anchor(name)}}}"
        lines += section
    return lines


def config_roots(module) -> list:
    """The config's top-level models: those of the module that no other model of it holds."""
    models = [obj for name, obj in vars(module).items() if _is_model(obj) and obj.__module__ == module.__name__
              and not name.startswith("_")]
    held = {m for model in models for info in model.model_fields.values() for m in _models_in(info.annotation)}
    return [m for m in models if m not in held]


def config_sections(module) -> list[str]:
    """The top-level sections (fields holding a model) of each root config model, e.g. ['model', 'tasks', ...]."""
    return [name for root in config_roots(module) for name, info in root.model_fields.items()
            if _models_in(info.annotation)]


def config_reference(module) -> str:
    lines = ["# Config reference", "",
             "<!-- Generated at build time from the pydantic models of lorawatch.config (docs/hooks/reference.py). -->",
             "", _paragraphs(module.__doc__), "",
             "A config is YAML or JSON; data paths in a file are relative to the file. `lorawatch run --set "
             "FIELD=VALUE` changes any field by its dotted name (`tasks.*.max_train_rows=96`, where `*` is every "
             "task). An unknown field is refused, not ignored. A field whose default is — may be left out. This "
             "page is generated from the models themselves when the site is built, so it lists what the code "
             "accepts; [Getting started](getting-started.md) has an annotated example."]
    seen: set = set()
    for root in config_roots(module):
        seen.add(root)
        lines += _model_sections(root, "", 2, seen)
    return "\n".join(lines) + "\n"


# --- Links to the repository's own files -----------------------------------------------------------------------

def _repo_root(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def _outside_target(target: str, page_dir: Path, docs_dir: Path, repo: Path) -> Path | None:
    """The repository file a relative link points to when it lies outside docs/, else None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target, re.I):
        return None
    path = (page_dir / target.split("#")[0]).resolve()
    if path.is_relative_to(docs_dir) or not path.is_relative_to(repo) or not path.is_file():
        return None
    return path


def _readme_as_index(config) -> str:
    """The README with its links made relative to docs/: `docs/x.md` becomes `x.md`; a link to any other
    repository file goes to its copy under repo/."""
    repo = _repo_root(config)

    def relink(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target, re.I):
            return match.group(0)
        if target.startswith("docs/"):
            return match.group(1) + target[len("docs/"):] + match.group(3)
        return match.group(1) + f"{REPO_FOLDER}/{target}" + match.group(3)

    readme = (repo / "README.md").read_text(encoding="utf-8")
    return _LINK.sub(relink, readme)


def _page_dir(file: File, docs_dir: Path) -> Path:
    return (docs_dir / file.src_uri).parent


def on_files(files: Files, config) -> Files:
    import lorawatch.cli
    import lorawatch.config

    docs_dir = Path(config["docs_dir"]).resolve()
    repo = _repo_root(config)
    files.append(File.generated(config, "index.md", content=_readme_as_index(config)))
    files.append(File.generated(config, CLI_PAGE, content=cli_reference(lorawatch.cli.app)))
    files.append(File.generated(config, CONFIG_PAGE, content=config_reference(lorawatch.config)))
    wanted = {}
    for page in files.documentation_pages():
        for match in _LINK.finditer(page.content_string):
            target = match.group(2)
            if page.src_uri == "index.md" and target.startswith(f"{REPO_FOLDER}/"):
                path = repo / target[len(REPO_FOLDER) + 1:].split("#")[0]
                path = path if path.is_file() else None
            else:
                path = _outside_target(target, _page_dir(page, docs_dir), docs_dir, repo)
            if path is not None:
                wanted[path.relative_to(repo).as_posix()] = path
    for relative, path in sorted(wanted.items()):
        uri = f"{REPO_FOLDER}/{relative}"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Links from a docs page to a repository file outside docs/ point to its copy under repo/."""
    docs_dir = Path(config["docs_dir"]).resolve()
    repo = _repo_root(config)
    page_dir = _page_dir(page.file, docs_dir)

    def relink(match: re.Match) -> str:
        target = match.group(2)
        path = _outside_target(target, page_dir, docs_dir, repo)
        if path is None:
            return match.group(0)
        copy = docs_dir / REPO_FOLDER / path.relative_to(repo)
        fragment = target[len(target.split("#")[0]):]
        relative = posixpath.relpath(copy.as_posix(), page_dir.as_posix())
        return match.group(1) + relative + fragment + match.group(3)

    return _LINK.sub(relink, markdown)

