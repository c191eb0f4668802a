"""mkdocs hook: the configuration reference and the API parameter table, generated from the code.

A page holds a marker (``<!-- generated: configuration -->`` or ``<!-- generated: api-parameters -->``)
and the build replaces it with a table read from the definitions the service itself runs on: every
field of ``app.config.Settings`` with the comments written beside it in the source, and every
``Param`` of every route's ``Params`` as ``app.routes.openapi`` registers them. A field without a
description, or an unknown marker, fails the build, so the reference cannot go stale or incomplete.
"""
from __future__ import annotations

import ast
import inspect
import io
import re
import sys
import tokenize
from dataclasses import MISSING, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _sources():
    """The modules the references are read from: the settings, and every route module of
    ``app.routes`` (importing one registers its operations, with their ``Params``, in ``openapi``)."""
    import importlib
    import pkgutil

    import app.routes
    from app import config
    from app.routes import openapi

    for module in pkgutil.iter_modules(app.routes.__path__):
        importlib.import_module(f"app.routes.{module.name}")
    return config, openapi


MARKER = re.compile(r"<!--\s*generated:\s*([\w-]+)\s*-->")


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"{page.file.src_path}: unknown generated section {name!r} "
                             f"(known: {', '.join(GENERATORS)})")
        return GENERATORS[name]()
    return MARKER.sub(replace, markdown)


# -- Configuration ---------------------------------------------------------------------------------

def settings_docs(config_module) -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(section, [(field, description), ...]), ...]`` from the ``Settings`` source.

    The source's conventions: a comment block after a blank line opens a section; a comment at the
    end of a field's line is its description, continued by comment-only lines indented past the
    fields; a comment block directly above a field (no blank line before it) is that field's
    description too. A field with no comment of its own takes its section's comment when it is the
    section's only field.
    """
    source = Path(inspect.getsourcefile(config_module)).read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    field_at = {n.lineno: n.target.id for n in cls.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    last = max(n.end_lineno for n in cls.body if isinstance(n, ast.AnnAssign))
    comments: dict[int, tuple[int, str]] = {}  # line -> (column, text)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and cls.lineno < tok.start[0] <= last:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    lines = source.splitlines()
    field_col = cls.body[0].col_offset

    sections: list[tuple[str, list[tuple[str, str]]]] = []
    descriptions: dict[str, list[str]] = {}
    section_text: list[str] = []
    lead: list[str] = []
    previous = "start"  # what the line before was: start | blank | section | lead | field
    current_field = None
    for number in range(cls.lineno + 1, last + 1):
        text = lines[number - 1]
        if not text.strip():
            previous, lead = "blank", []
            continue
        if number in field_at:
            current_field = field_at[number]
            if previous in ("start", "blank", "section") and section_text:
                sections.append((" ".join(section_text), []))
                section_text = []
            own = lead + ([comments[number][1]] if number in comments else [])
            descriptions[current_field] = own
            sections[-1][1].append((current_field, ""))
            previous, lead = "field", []
            continue
        if number not in comments:  # a field's value continued over several lines
            continue
        column, comment = comments[number]
        if column > field_col and previous == "field":
            descriptions[current_field].append(comment)  # continues the field's trailing comment
        elif previous in ("start", "blank", "section"):
            section_text.append(comment)
            previous = "section"
        else:
            lead.append(comment)
            previous = "lead"

    result = []
    for title, members in sections:
        described = []
        for name, _ in members:
            text = " ".join(descriptions[name])
            if not text and len(members) == 1:
                text = title
            if not text:
                raise ValueError(f"Settings.{name} has no description: write a comment beside it in "
                                 f"{config_module.__name__}")
            described.append((name, text))
        result.append((title, described))
    return result


def _default(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        home = str(Path.home())
        return '"' + (("~" + value[len(home):]) if value.startswith(home + "/") else value) + '"'
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    return str(value)


def _cell(text: str) -> str:
    """Text for a table cell: pipes escaped, and outside `code` spans the characters Markdown would
    take for HTML or emphasis (``Bearer <key>``, ``Qwen3-ForcedAligner-*-hf``)."""
    parts = text.replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # the even parts lie outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return "`".join(parts).replace("|", "\\|")


def configuration() -> str:
    config, _ = _sources()
    by_name = {f.name: f for f in fields(config.Settings)}
    defaults = config.Settings()
    out = []
    documented = set()
    for title, members in settings_docs(config):
        out += [f"### {title.rstrip('.:')}", "",
                "| setting | type | default | environment | description |",
                "| --- | --- | --- | --- | --- |"]
        for name, text in members:
            f = by_name[name]
            env = config.ENV_PREFIX + name.upper()
            default = _default(getattr(defaults, name)) if f.default is not MISSING or f.default_factory is not MISSING else ""
            out.append(f"| `{name}` | {f.type} | `{default}` | `{env}` | {_cell(text)} |")
            documented.add(name)
        out.append("")
    missing = set(by_name) - documented
    if missing:
        raise ValueError(f"Settings fields missing from the configuration reference: {', '.join(sorted(missing))}")
    return "\n".join(out)


# -- API parameters -------------------------------------------------------------------------------

def _param_default(p, settings) -> str:
    if p.setting:
        return f"the `{p.setting}` setting (`{_default(p.default_for(settings))}`)"
    if p.default in (None, "", ()):
        return "none"
    value = list(p.default) if isinstance(p.default, tuple) else p.default
    return f"`{value}`"


def _bounds(p) -> str:
    parts = []
    if p.choices:
        parts.append(", ".join(f"`{c}`" for c in p.choices))
    if p.minimum is not None or p.maximum is not None:
        parts.append(f"{p.minimum:g} to {p.maximum:g}")
    if p.max_length is not None:
        parts.append(f"at most {p.max_length} characters")
    if p.aliases:
        parts.append("also as " + ", ".join(f"`{a}`" for a in p.aliases))
    return "; ".join(parts)


def api_parameters() -> str:
    config, openapi = _sources()
    settings = config.Settings()
    out = []
    first_route: dict[int, str] = {}
    for op in openapi.OPERATIONS:
        route = f"{op.method.upper()} {op.path}"
        out += [f"### `{route}`", ""]
        params = op.params.params if op.params else ()
        where = {"query": "form fields or in the query string" if op.upload else "in the query string",
                 "form": "multipart form fields"}[op.params_in]
        if op.upload:
            body = f"The audio goes in the multipart field `{op.upload}`"
            if op.params and op.params.ignore:
                body += " (or " + ", ".join(f"`{n}`" for n in op.params.ignore if n != op.upload) + ")"
            if op.raw_body:
                body += ", or as a raw `audio/*` body"
            out += [body.replace(" (or )", "") + ".", ""]
        if not params:
            out += ["No parameters.", ""]
            continue
        if id(op.params) in first_route:
            out += [f"The same parameters as `{first_route[id(op.params)]}`.", ""]
            continue
        first_route[id(op.params)] = route
        out += [f"Parameters, as {where}:", "",
                "| parameter | type | default | values | description |",
                "| --- | --- | --- | --- | --- |"]
        for p in params:
            out.append(f"| `{p.name}` | {p.type} | {_param_default(p, settings)} | {_cell(_bounds(p))} | {_cell(p.description)} |")
        out.append("")
        if op.params.unsupported:
            accepted = ", ".join(f"`{name}={value}`" for name, value in op.params.unsupported.items())
            out += [f"Recognised but not implemented: {accepted} is accepted (what the service does anyway); "
                    "any other value of these is refused with 422.", ""]
    return "\n".join(out)


GENERATORS = {"configuration": configuration, "api-parameters": api_parameters}
