"""The state inspector of `durable-heap serve --inspect`: ``GET /_inspect``.

A read-only page: the program's versions, its workflows and timers (once
durable execution is part of durable_heap), and the state tree, expandable node
by node. Each expansion asks ``GET /_inspect/node?path=...&offset=N`` for one
page of a node's children (`PAGE` of them), read in a transaction that is
aborted: a container of a million entries costs one page, never a scan, and
nothing the page does can change state. `Service._runtime` lets loopback
clients only reach it, and only with ``--inspect``.

A node's path is a JSON list of steps from ``state``: ``["a", name]`` (an
attribute of an Object), ``["k", key]`` (a key of a dict, in tagged JSON),
``["i", n]`` (the n-th item of a list, or member of a set, in its order).
``/_inspect?open=[step, ...]`` opens the page with that path expanded.
"""

from __future__ import annotations

import html
import json
from itertools import islice
from typing import TYPE_CHECKING, Any

from ._containers import Dict, List, Set
from ._http import Answer, Request, _error, _json_answer
from ._jsonform import decode, encode
from ._state import Object, State

if TYPE_CHECKING:
    from ._serve import Service

__all__ = ["PAGE", "answer", "children"]

#: Children shown per expansion of a node.
PAGE = 50


def answer(service: Service, request: Request) -> Answer:
    """The page, or one node's children as JSON."""
    if request.method not in ("GET", "HEAD"):
        return _error(405, "MethodNotAllowed", "the inspector is read-only: use GET")
    path = request.path.rstrip("/")
    if path == "/_inspect":
        return 200, [("content-type", "text/html; charset=utf-8")], _page(service).encode("utf-8")
    if path == "/_inspect/node":
        query = request.query
        try:
            steps = json.loads(query.get("path", "[]"))
            offset = int(query.get("offset", "0"))
            if not isinstance(steps, list) or offset < 0:
                raise ValueError("path must be a JSON list and offset at least 0")
        except ValueError as exc:
            return _error(400, "BadRequest", f"bad node address: {exc}")
        return _read(service, lambda state: _json_answer(200, children(_walk(state, steps), offset)))
    return _error(404, "NotFound", f"{request.path}: the inspector has /_inspect and /_inspect/node")


def _read(service: Service, func: Any) -> Answer:
    """Run ``func(state)`` in a transaction that is always aborted (reads only)."""
    heap = service.heap
    tm = heap.transaction_manager
    tm.begin()
    try:
        with heap.activate():
            return func(heap.state)  # type: ignore[no-any-return]
    except (KeyError, IndexError, AttributeError, LookupError) as exc:
        return _error(404, "NotFound", f"no such node: {exc}")
    finally:
        tm.abort()


def _walk(obj: Any, steps: list[Any]) -> Any:
    for step in steps:
        if not (isinstance(step, list) and len(step) == 2):
            raise KeyError(f"bad step {step!r}")
        kind, arg = step
        if kind == "a" and isinstance(obj, Object):
            if arg not in obj._dh_as_dict():
                raise AttributeError(arg)
            obj = getattr(obj, arg)
        elif kind == "k" and isinstance(obj, (Dict, dict)):
            obj = obj[decode(arg)]
        elif kind == "i" and isinstance(obj, (List, list, tuple)):
            obj = obj[int(arg)]
        elif kind == "i" and isinstance(obj, (Set, set, frozenset)):
            obj = next(islice(obj, int(arg), None))
        else:
            raise KeyError(f"step {step!r} does not fit a {type(obj).__name__}")
    return obj


def children(obj: Any, offset: int = 0, limit: int = PAGE) -> dict[str, Any]:
    """One page of `obj`'s children: label, step, summary and whether each can expand."""
    rows: list[dict[str, Any]] = []
    total = 0
    if isinstance(obj, (Dict, dict)):
        total = len(obj)
        for k, v in islice(obj.items(), offset, offset + limit):
            rows.append(_row(repr(k), ["k", _key(k)], v))
    elif isinstance(obj, (List, list, tuple)):
        total = len(obj)
        for i, v in enumerate(islice(obj, offset, offset + limit), start=offset):
            rows.append(_row(f"[{i}]", ["i", i], v))
    elif isinstance(obj, (Set, set, frozenset)):
        total = len(obj)
        for i, v in enumerate(islice(obj, offset, offset + limit), start=offset):
            rows.append(_row("-", ["i", i], v))
    elif isinstance(obj, Object):
        attrs = obj._dh_as_dict()
        total = len(attrs)
        for name, v in islice(attrs.items(), offset, offset + limit):
            rows.append(_row(name, ["a", name], v))
    return {"summary": summary(obj), "total": total, "offset": offset, "children": rows,
            "more": max(0, total - offset - len(rows))}


def _key(k: Any) -> Any:
    try:
        return encode(k)
    except ValueError:
        return repr(k)


def _row(label: str, step: list[Any], value: Any) -> dict[str, Any]:
    expandable = isinstance(value, (Dict, List, Set, Object, dict, list, tuple, set, frozenset)) and bool(
        len(value._dh_as_dict()) if isinstance(value, Object) else len(value))
    return {"label": label, "step": step, "summary": summary(value), "expandable": expandable}


def summary(obj: Any) -> str:
    """One line about a value: its kind and size for containers, its repr (cut) otherwise."""
    if isinstance(obj, (Dict, List, Set)):
        n = len(obj)
        return f"{type(obj).__name__} ({n:,} {'item' if n == 1 else 'items'})"
    if isinstance(obj, State):
        n = len(obj._dh_as_dict())
        return f"State ({n:,} {'name' if n == 1 else 'names'})"
    if isinstance(obj, Object):
        return f"{type(obj).__module__}.{type(obj).__qualname__}"
    text = repr(obj)
    return text if len(text) <= 100 else text[:97] + "..."


def _page(service: Service) -> str:
    program = service.program
    versions = [v for v in _versions(service)]
    rows = "".join(
        f"<tr><td>{'*' if v.current else ''}{v.number}</td><td>{v.deployed_at:%Y-%m-%d %H:%M:%S}</td>"
        f"<td><code>{v.source_hash[:12]}</code></td><td>{html.escape(v.note)}</td></tr>"
        for v in reversed(versions[-20:])
    )
    scheduler = service.workflows.state()
    esc = html.escape
    listing = service.workflows.listing()
    if listing is not None:
        flows, timers = listing
        flow_rows = "".join(
            f"<tr><td><code>{esc(str(f['id']))}</code></td><td>{esc(str(f['function']))}</td>"
            f"<td>{esc(str(f['status']))}</td><td>{esc(_when(f['since']))}</td>"
            f"<td>{esc(_waits(f['waiting_on']))}</td></tr>" for f in flows)
        timer_rows = "".join(
            f"<tr><td><code>{esc(str(t['id']))}</code></td><td>{esc(str(t['kind']))}</td>"
            f"<td>{esc(str(t['target']))}</td>"
            f"<td>{'dead letter' if t['dead'] else esc(_when(t['due']))}</td></tr>"
            for t in timers)
        scheduler_text = (
            f"<div>scheduler: {esc(str(scheduler.get('state', '')))}</div>"
            "<table><tr><th>workflow</th><th>function</th><th>status</th><th>since (UTC)</th>"
            f"<th>waiting on</th></tr>{flow_rows or '<tr><td colspan=5>none</td></tr>'}</table>"
            "<table><tr><th>timer</th><th>kind</th><th>target</th><th>due (UTC)</th></tr>"
            f"{timer_rows or '<tr><td colspan=4>none</td></tr>'}</table>"
        )
    else:
        scheduler_text = esc(scheduler.get("state", "")) + (
            f" ({esc(scheduler['reason'])})" if "reason" in scheduler else "")
    return _TEMPLATE.format(
        program=esc(program.name),
        serving=program._loaded[0] or "?",
        heap=esc(str(service.heap.target)),
        versions=rows or "<tr><td colspan=4>none</td></tr>",
        workflows=scheduler_text,
        page=PAGE,
    )


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if hasattr(value, "strftime") else str(value or "")


def _waits(waiting: Any) -> str:
    if not waiting:
        return ""
    if waiting.get("resolved") is not None:
        return f"promise {waiting['promise']!r} resolved {_when(waiting['resolved'])}: its wake is due"
    return ", ".join(f"{k} {_when(v)}" if k != "promise" else f"promise {v!r}" for k, v in waiting.items()
                     if v is not None)


def _versions(service: Service) -> list[Any]:
    from ._versions import versions

    return versions(service.heap, service.program.path)


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{program}: durable-heap inspector</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }} h2 {{ font-size: 15px; margin: 22px 0 6px; }}
.meta {{ color: #666; }} table {{ border-collapse: collapse; }}
td, th {{ padding: 2px 10px 2px 0; text-align: left; }}
ul.tree {{ list-style: none; padding-left: 18px; margin: 0; }} #tree > ul.tree {{ padding-left: 0; }}
.node {{ cursor: default; }}
.toggle {{ cursor: pointer; color: #0a58ca; display: inline-block; width: 14px; }}
.label {{ font-family: ui-monospace, monospace; }}
.summary {{ color: #555; font-family: ui-monospace, monospace; }}
button.more {{ margin: 2px 0 2px 18px; font-size: 12px; }}
</style></head><body>
<h1>{program}</h1>
<div class="meta">version {serving} serving &middot; heap <code>{heap}</code> &middot; read-only view</div>
<h2>State</h2><div id="tree"></div>
<h2>Versions</h2>
<table><tr><th>version</th><th>deployed (UTC)</th><th>source</th><th>note</th></tr>{versions}</table>
<h2>Workflows and timers</h2><div>{workflows}</div>
<script>
const PAGE = {page};
async function load(path, offset) {{
  const q = new URLSearchParams({{path: JSON.stringify(path), offset: String(offset)}});
  const r = await fetch("/_inspect/node?" + q);
  if (!r.ok) throw new Error((await r.json()).error.message);
  return r.json();
}}
function row(parentPath, child) {{
  const li = document.createElement("li");
  li.className = "node";
  const path = parentPath.concat([child.step]);
  const t = document.createElement("span");
  t.className = "toggle";
  t.textContent = child.expandable ? "\u25b8" : "";
  const label = document.createElement("span");
  label.className = "label"; label.textContent = child.label + ": ";
  const sum = document.createElement("span");
  sum.className = "summary"; sum.textContent = child.summary;
  li.append(t, label, sum);
  li.dataset.step = JSON.stringify(child.step);
  if (child.expandable) {{
    let open = null;
    li.toggle = async () => {{
      if (open) {{ open.remove(); open = null; t.textContent = "\u25b8"; return null; }}
      open = document.createElement("ul"); open.className = "tree";
      li.append(open); t.textContent = "\u25be";
      await fill(open, path, 0);
      return open;
    }};
    t.onclick = li.toggle;
  }}
  return li;
}}
async function fill(ul, path, offset) {{
  const page = await load(path, offset);
  for (const child of page.children) ul.append(row(path, child));
  if (page.more > 0) {{
    const b = document.createElement("button");
    b.className = "more"; b.textContent = page.more.toLocaleString() + " more";
    b.onclick = async () => {{ b.remove(); await fill(ul, path, offset + page.children.length); }};
    ul.append(b);
  }}
}}
(async () => {{
  const root = document.createElement("ul"); root.className = "tree";
  const top = await load([], 0);
  const head = document.createElement("div");
  head.innerHTML = "<span class='label'>state</span>: <span class='summary'></span>";
  head.querySelector(".summary").textContent = top.summary;
  document.getElementById("tree").append(head, root);
  await fill(root, [], 0);
  // ?open=[step, ...] opens that path (a link to a node)
  const wanted = new URLSearchParams(location.search).get("open");
  let ul = root;
  for (const step of wanted ? JSON.parse(wanted) : []) {{
    const li = [...ul.children].find(e => e.dataset && e.dataset.step === JSON.stringify(step));
    if (!li || !li.toggle) break;
    ul = await li.toggle();
  }}
  document.body.dataset.ready = "1";
}})();
</script></body></html>
"""
