"""The HTML of `regimen report`: a comparison page and a one-run page.

Pages are self-contained so that they open from disk, are mailed as a folder and never call the
network: CSS inline, figures as PNG files beside the page referenced by relative path, the run
colours as inline SVG, and no scripts. Every text from a run (names, strategy values) is escaped.
The pages carry `data-*` attributes (`data-run`, `data-key`, `data-rank`) so that tests and
scripts can read them without scraping text.

Example:
    >>> from regimen.rundir import load_run
    >>> html = single_page(load_run("runs/adam"), [], unit="nats/token",
    ...                    data="tokens", base=None, target=None, title="adam")  # doctest: +SKIP
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from regimen.ranking import MISSING, Comparison, ranked_on, same_value, time_to_loss
from regimen.rundir import read_samples

if TYPE_CHECKING:
    from regimen.figures import FigureFile
    from regimen.rundir import Run

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d8dee4; --panel: #ffffff; --page: #f3f5f7;
        --win: #fff6d6; --win-line: #e6b800; --ok: #1a7f37; --run: #9a6700; --bad: #cf222e; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; background: var(--page); }
body { margin: 0; background: var(--page); color: var(--fg);
       font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1280px; margin: 0 auto; padding: 28px 28px 40px; }
header { margin-bottom: 8px; }
h1 { font-size: 26px; line-height: 1.25; margin: 0 0 6px; }
h2 { font-size: 18px; margin: 0 0 4px; }
.sub, .note, figcaption, footer { color: var(--muted); }
.sub { margin: 0; font-size: 15px; }
.note { font-size: 13.5px; margin: 0 0 14px; max-width: 90ch; }
section { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; padding: 20px 24px 22px; margin-top: 20px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 13px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 8px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: middle; }
th { background: #f6f8fa; color: var(--muted); font-weight: 600; font-size: 12.5px; white-space: nowrap; }
td.num, th.num { text-align: right; white-space: nowrap; }
td.muted { color: var(--muted); }
td.phase { white-space: nowrap; }
tbody tr:last-child td { border-bottom: none; }
tr.winner td { background: var(--win); }
tr.winner td:first-child { box-shadow: inset 4px 0 0 var(--win-line); }
td.run { min-width: 12ch; max-width: 48ch; }
.runname { display: inline-flex; align-items: baseline; gap: 8px; vertical-align: middle; }
.runname svg { flex: none; align-self: center; }
.runname code { overflow-wrap: break-word; }
small { color: var(--muted); font-size: 12px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px; font-weight: 600; line-height: 1.6;
         vertical-align: 1px; }
.badge.winner { background: var(--win-line); color: #3b2f00; margin-left: 8px; }
.badge.finished { background: #dafbe1; color: var(--ok); }
.badge.running { background: #fff1c2; color: var(--run); }
.badge.other { background: #ffebe9; color: var(--bad); }
.diff td.same { color: #aab2bb; }
.diff td.unset, .diff td.value { white-space: nowrap; }
.diff tr.base td { background: #f6f8fa; color: var(--muted); font-style: italic; }
figure { margin: 0 0 26px; }
figure:last-child { margin-bottom: 0; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto;
             border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figcaption { font-size: 13.5px; margin-top: 8px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; margin-top: 6px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background: #fbfcfd; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; }
.card .value { font-size: 21px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .value small { font-size: 12px; font-weight: 400; }
.sections { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 16px 24px; margin-top: 8px; }
.sections h3 { font-size: 14px; margin: 0 0 4px; }
.sections table td { padding: 4px 8px; font-size: 13px; }
.sections td.key { color: var(--muted); width: 45%; }
tr.changed td { background: var(--win); }
details summary { cursor: pointer; font-weight: 600; margin: 4px 0; }
footer { font-size: 13px; margin-top: 22px; }
footer ul { margin: 4px 0 0; padding-left: 20px; }
"""

# Matplotlib line styles as SVG dash arrays, for the legend swatches in the tables.
_DASHES = {"-": "", "--": "6 3", ":": "1.5 3", "-.": "6 3 1.5 3"}


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def e(text: Any) -> str:
    """HTML-escaped `str(text)`."""
    return html.escape(str(text), quote=True)


def fmt_loss(value: float | None) -> str:
    """A loss with four decimals; `nan`/`inf` as such; None as a dash."""
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}"


def fmt_count(value: float | None) -> str:
    """12,345 (or 1.2M past ten million)."""
    if value is None or not math.isfinite(value):
        return "—"
    if abs(value) >= 1e7:
        return f"{value / 1e6:,.1f}M"
    return f"{value:,.0f}"


def fmt_rate(value: float | None) -> str:
    """Throughput with three significant digits: 812, 12.3k, 1.05M."""
    if value is None or not math.isfinite(value):
        return "—"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def fmt_memory(mb: float | None) -> str:
    """MiB as `812 MB` or `12.4 GB`; unmeasured (None or 0) as a dash."""
    if mb is None or not math.isfinite(mb) or mb <= 0:
        return "—"
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def fmt_duration(seconds: float | None) -> str:
    """`42.1 s`, `3 min 12 s`, `2 h 05 min`."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def fmt_value(value: Any) -> str:
    """A strategy value as TOML writes it (`true`, `0.0003`, `[0.9, 0.95]`); unset as a dash."""
    if value is MISSING:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same number
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {fmt_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def swatch(colour: str, linestyle: Any) -> str:
    """An inline SVG line in a run's colour and dash pattern, like its line in the figures."""
    if isinstance(linestyle, tuple):
        dashes = " ".join(f"{d:g}" for d in linestyle[1])
    else:
        dashes = _DASHES.get(linestyle, "")
    dash = f' stroke-dasharray="{dashes}"' if dashes else ""
    return (
        f'<svg width="30" height="10" viewBox="0 0 30 10" aria-hidden="true">'
        f'<line x1="1" y1="5" x2="29" y2="5" stroke="{e(colour)}" stroke-width="3"{dash}/></svg>'
    )


def run_label(name: str, colour: str, linestyle: Any) -> str:
    """A run's swatch and name; long names (`optimizer.name=sgd,lr.schedule=...`) may wrap
    after a comma, slash, dash or underscore rather than in the middle of a word."""
    text = re.sub(r"([,/_-])", r"\1<wbr>", e(name))
    return f"<span class='runname'>{swatch(colour, linestyle)}<code>{text}</code></span>"


def status_badge(status: str, reason: str | None = None) -> str:
    """A coloured pill: finished (green), running (amber), anything else (red), with a failed run's one-line reason."""
    kind = status if status in ("finished", "running") else "other"
    why = f"<br><small class='reason'>{e(reason)}</small>" if reason else ""
    return f'<span class="badge {kind}">{e(status)}</span>{why}'


def _reason(run: Run) -> str | None:
    """Why a run failed (its summary's one-line error), or None."""
    error = (run.summary or {}).get("error")
    return str(error) if error else None


def incidents(run: Run) -> str:
    """`3 steps skipped, 1 rollback` from the summary's `events` (non-finite steps), or ''."""
    events = (run.summary or {}).get("events")
    if not isinstance(events, list):
        return ""
    kinds = [ev.get("event") for ev in events if isinstance(ev, Mapping)]
    skips, rollbacks = kinds.count("skip"), kinds.count("rollback")
    parts = [f"{skips} step{'s' * (skips != 1)} skipped"] if skips else []
    parts += [f"{rollbacks} rollback{'s' * (rollbacks != 1)}"] if rollbacks else []
    return ", ".join(parts)


def throughput(run: Run, data: str) -> float | None:
    """tokens/s for sequence models; samples/s otherwise."""
    if data == "tokens" or (run.tokens is not None and run.tokens == run.samples):
        return run.tokens_per_s
    if run.samples and run.wall_time:
        return run.samples / run.wall_time
    return None


def _document(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="regimen report">\n'
        f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _figures(figures: Sequence[FigureFile]) -> str:
    return "\n".join(
        f'<figure><img src="{e(f.file)}" alt="{e(f.alt)}" width="{f.width}" height="{f.height}">'
        f"<figcaption>{e(f.caption)}</figcaption></figure>"
        for f in figures
    )


def _footer(runs: Sequence[Run]) -> str:
    items = "".join(f"<li><code>{e(r.name)}</code>: <code>{e(r.path)}</code></li>" for r in runs)
    return f"<footer>Made by <code>regimen report</code> from:<ul>{items}</ul></footer>"


# --------------------------------------------------------------------------------------------
# The comparison page
# --------------------------------------------------------------------------------------------


def comparison_page(
    c: Comparison, figures: Sequence[FigureFile], colours: Mapping[str, tuple[str, Any]], title: str, extra: Sequence[str] = ()
) -> str:
    """The page comparing several runs (see `regimen.report.write_report`); `colours` are the figures' run styles.

    `extra` sections (HTML, e.g. `race_section`) come right after the ranking."""
    runs, ranked, winner, unit, data = c.runs, c.ranked, c.winner, c.unit, c.data
    finished = sum(r.status == "finished" for r in runs)
    going = sum(r.status == "running" for r in runs)
    counts = f"{len(runs)} runs: {finished} finished" + (f", {going} running" if going else "")
    other = len(runs) - finished - going
    counts += f", {other} stopped early" if other else ""
    head = f"<header><h1>{e(title)}</h1><p class='sub'>{e(counts)}."
    if winner is not None:
        best = next(r for r in ranked if r.name == winner)
        on = "best validation loss" if best.best_val_loss is not None else "final training loss"
        value = best.best_val_loss if best.best_val_loss is not None else best.final_loss
        head += f" Winner: <strong><code>{e(winner)}</code></strong>, {on} {fmt_loss(value)} {e(unit)}."
    head += "</p></header>"

    body = [
        head,
        _ranking(ranked, winner, colours, unit, data, c.target),
        *extra,
        _diff_section(runs, colours, c.diff, c.base_given),
        "<section id='loss'><h2>Loss</h2>"
        f"<p class='note'>Training loss (left) and validation loss (right), in {e(unit)}, against steps, "
        f"{e(data)} and wall-clock time. Non-finite values are left out.</p>"
        f"{_figures(figures[:3])}</section>",
        f"<section id='schedules'><h2>Schedules</h2>{_figures(figures[3:])}</section>",
        _shared_section(c.shared),
        _footer(runs),
    ]
    return _document(title, "\n".join(body))


def _ranking(
    ranked: Sequence[Run],
    winner: str | None,
    colours: Mapping[str, tuple[str, Any]],
    unit: str,
    data: str,
    target: tuple[float, str] | None,
) -> str:
    rate = "tokens/s" if data == "tokens" else "samples/s"
    target_head = f"time to ≤ {target[0]:.4f}" if target else "time to target"
    heads = [
        ("#", "num"),
        ("run", ""),
        ("status", ""),
        ("best val loss", "num"),
        ("final train loss", "num"),
        (target_head, "num"),
        (rate, "num"),
        ("peak memory", "num"),
        ("steps", "num"),
        ("wall time", "num"),
    ]
    rows = []
    for i, run in enumerate(ranked, 1):
        is_winner = run.name == winner
        reached = time_to_loss(run, target[0]) if target else None
        if target is None:
            to_target = "<td class='num muted'>—</td>"
        elif reached is None:
            to_target = "<td class='num muted'>not reached</td>"
        else:
            seconds, step, kind = reached
            train = " (train loss)" if kind == "train" else ""
            to_target = f"<td class='num'>{fmt_duration(seconds)}<br><small>step {step:,}{train}</small></td>"
        on = ranked_on(run)
        colour, ls = colours[run.name]
        badge = "<span class='badge winner'>★ winner</span>" if is_winner else ""
        cells = [
            f"<td class='num'>{i}</td>",
            f"<td class='run'>{run_label(run.name, colour, ls)}{badge}</td>",
            f"<td>{status_badge(run.status, _reason(run))}{f'<br><small>{e(incidents(run))}</small>' if incidents(run) else ''}</td>",
            f"<td class='num'>{fmt_loss(run.best_val_loss)}</td>",
            f"<td class='num'>{fmt_loss(run.final_loss)}{'<br><small>ranked on this</small>' if on and on[0] == 'train' else ''}</td>",
            to_target,
            f"<td class='num'>{fmt_rate(throughput(run, data))}</td>",
            f"<td class='num'>{fmt_memory(run.peak_memory_mb)}</td>",
            f"<td class='num'>{fmt_count(run.steps)}</td>",
            f"<td class='num'>{fmt_duration(run.wall_time)}</td>",
        ]
        cls = " class='winner'" if is_winner else ""
        rows.append(f"<tr data-run='{e(run.name)}' data-rank='{i}'{cls}>{''.join(cells)}</tr>")
    head = "".join(f"<th class='{c}'>{e(h)}</th>" if c else f"<th>{e(h)}</th>" for h, c in heads)
    if target:
        rule = (
            f"Target loss {target[0]:.4f} {e(unit)}: {e(target[1])}. Time to target is the wall-clock time from the start of "
            "training to the first logged evaluation at or below it (training loss for runs that never evaluated)."
        )
    else:
        rule = "No run logged a finite loss yet, so there is no target loss."
    note = (
        f"Ranked by best validation loss ({e(unit)}); runs that never evaluated follow, ranked by final training loss. "
        f"{rule} Runs without <code>summary.json</code> are still going (or died) and show their latest numbers."
    )
    return (
        "<section id='ranking'><h2>Ranking</h2>"
        f"<p class='note'>{note}</p>"
        f"<div class='scroll'><table class='ranking'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        "</section>"
    )


def _diff_section(
    runs: Sequence[Run],
    colours: Mapping[str, tuple[str, Any]],
    diff: Mapping[str, Mapping[str, Any]],
    base_given: bool,
) -> str:
    keys: list[str] = []
    for changes in diff.values():
        keys += [k for k in changes if k not in keys]
    if base_given:
        note = "The strategy keys where each run differs from the base strategy; a grey dot means the same as the base."
    else:
        note = "The strategy keys on which the runs differ; every other key is the same in all runs (listed at the end)."
    if not keys:
        text = "Every run has the same strategy as the base." if base_given else "All runs have the same strategy."
        return f"<section id='strategies'><h2>Strategy differences</h2><p class='note'>{text}</p></section>"
    head = "<th>run</th>" + "".join(f"<th data-key='{e(k)}'><code>{e(k)}</code></th>" for k in keys)
    rows = []
    for run in runs:
        colour, ls = colours[run.name]
        changes = diff.get(run.name, {})
        cells = []
        for k in keys:
            if k in changes:
                cells.append(f"<td class='value' data-key='{e(k)}'><code>{e(fmt_value(changes[k]))}</code></td>")
            else:
                cells.append("<td class='same'>·</td>")
        rows.append(f"<tr data-run='{e(run.name)}'><td class='run'>{run_label(run.name, colour, ls)}</td>{''.join(cells)}</tr>")
    return (
        "<section id='strategies'><h2>Strategy differences</h2>"
        f"<p class='note'>{note}</p>"
        f"<div class='scroll'><table class='diff'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        "</section>"
    )


def _shared_section(shared: Mapping[str, Any]) -> str:
    if not shared:
        return ""
    rows = "".join(f"<tr><td class='key'><code>{e(k)}</code></td><td><code>{e(fmt_value(v))}</code></td></tr>" for k, v in shared.items())
    return (
        "<section id='shared'><details><summary>Settings every run shares "
        f"({len(shared)} keys)</summary><div class='scroll'><table class='shared'><tbody>{rows}</tbody></table></div>"
        "</details></section>"
    )


# --------------------------------------------------------------------------------------------
# The one-run page
# --------------------------------------------------------------------------------------------


def single_page(
    run: Run,
    figures: Sequence[FigureFile],
    *,
    unit: str,
    data: str,
    base: Mapping[str, Any] | None,
    target: float | None,
    title: str,
) -> str:
    """The page of one run: summary numbers, its figures and its strategy."""
    cards = [
        ("best val loss", fmt_loss(run.best_val_loss), unit),
        ("final train loss", fmt_loss(run.final_loss), unit),
        ("final val loss", fmt_loss(run.final_val_loss), unit),
    ]
    if run.unigram_entropy is not None:
        cards.append(("unigram entropy", fmt_loss(run.unigram_entropy), unit))
    if target is not None:
        reached = time_to_loss(run, target)
        cards.append((f"time to ≤ {target:.4f}", fmt_duration(reached[0]) if reached else "not reached", ""))
    cards += [
        ("steps", fmt_count(run.steps), ""),
        ("samples", fmt_count(run.samples), ""),
    ]
    if data == "tokens":
        cards.append(("tokens", fmt_count(run.tokens), ""))
    cards += [
        ("wall time", fmt_duration(run.wall_time), ""),
        ("tokens/s" if data == "tokens" else "samples/s", fmt_rate(throughput(run, data)), ""),
        ("peak memory", fmt_memory(run.peak_memory_mb), ""),
    ]
    card_html = "".join(
        f"<div class='card'><div class='label'>{e(label)}</div><div class='value'>{e(value)}"
        f"{f' <small>{e(small)}</small>' if small and value not in ('—', 'not reached') else ''}</div></div>"
        for label, value, small in cards
    )
    going = (
        ""
        if run.summary is not None
        else " No <code>summary.json</code> yet: the run is still going (or died); numbers are the latest logged."
    )
    trouble = f" {e(incidents(run)).capitalize()}." if incidents(run) else ""
    badge = status_badge(run.status, _reason(run))
    head = f"<header><h1>{e(title)} {badge}</h1><p class='sub'><code>{e(run.path)}</code>.{trouble}{going}</p></header>"
    body = [
        head,
        f"<section id='summary'><h2>Summary</h2><div class='cards'>{card_html}</div></section>",
        f"<section id='plots'><h2>Plots</h2>{_figures(figures)}</section>",
        samples_section(read_samples(run.path)),  # what a language model wrote at each evaluation
        _strategy_section(run, base),
        _summary_extra(run),
        _footer([run]),
    ]
    return _document(title, "\n".join(b for b in body if b))


def _strategy_section(run: Run, base: Mapping[str, Any] | None) -> str:
    if not run.strategy:
        return "<section id='strategy'><h2>Strategy</h2><p class='note'>No <code>strategy.toml</code> in this run directory.</p></section>"
    blocks = []
    changed_any = False
    for section, table in run.strategy.items():
        if not isinstance(table, Mapping):
            continue
        rows = []
        for key, value in table.items():
            flat = f"{section}.{key}"
            changed = base is not None and not same_value(value, base.get(flat, MISSING))
            changed_any |= changed
            title = f" title='base: {e(fmt_value(base.get(flat, MISSING)))}'" if changed and base is not None else ""
            rows.append(
                f"<tr{' class=changed' if changed else ''} data-key='{e(flat)}'{title}>"
                f"<td class='key'><code>{e(key)}</code></td><td><code>{e(fmt_value(value))}</code></td></tr>"
            )
        blocks.append(f"<div><h3>[{e(section)}]</h3><table><tbody>{''.join(rows)}</tbody></table></div>")
    note = "The fully resolved strategy this run trained with."
    if base is not None:
        note += " Highlighted keys differ from the base." if changed_any else " It is the same as the base."
    return f"<section id='strategy'><h2>Strategy</h2><p class='note'>{note}</p><div class='sections'>{''.join(blocks)}</div></section>"


def _summary_extra(run: Run) -> str:
    shown = {
        "status",
        "final_loss",
        "final_val_loss",
        "best_val_loss",
        "tokens_per_s",
        "wall_time",
        "peak_memory_mb",
        "steps",
        "samples",
        "tokens",
        "unigram_entropy",
    }
    extra = {k: v for k, v in (run.summary or {}).items() if k not in shown}
    if not extra:
        return ""
    rows = "".join(
        f"<tr><td class='key'><code>{e(k)}</code></td><td><code>{e(f'{v:.6g}' if isinstance(v, float) else fmt_value(v))}</code></td></tr>"
        for k, v in extra.items()
    )
    table = f"<div class='scroll'><table><tbody>{rows}</tbody></table></div>"
    return f"<section id='summary-extra'><h2>More from summary.json</h2>{table}</section>"


def samples_section(rows: Sequence[Mapping[str, Any]]) -> str:
    """The samples of a run by step, as an HTML fragment for its report (every text escaped).

    >>> print(samples_section([{"step": 5, "prompt": "a<b", "text": " & c"}]))  # doctest: +NORMALIZE_WHITESPACE
    <section class="samples" id="samples">
    <h2>Samples</h2>
    <table>
    <thead><tr><th>step</th><th>prompt (grey), then the model's text</th></tr></thead>
    <tbody>
    <tr><td>5</td><td><pre style="white-space: pre-wrap; margin: 0"><span style="color: #888">a&lt;b</span> &amp; c</pre></td></tr>
    </tbody>
    </table>
    </section>
    """
    if not rows:
        return ""
    lines = [
        '<section class="samples" id="samples">',
        "<h2>Samples</h2>",
        "<table>",
        "<thead><tr><th>step</th><th>prompt (grey), then the model's text</th></tr></thead>",
        "<tbody>",
    ]
    for row in sorted(rows, key=lambda r: int(r.get("step", 0))):
        prompt, text = e(str(row.get("prompt", ""))), e(str(row.get("text", "")))
        lines.append(
            f'<tr><td>{int(row.get("step", 0))}</td><td><pre style="white-space: pre-wrap; margin: 0">'
            f'<span style="color: #888">{prompt}</span>{text}</pre></td></tr>'
        )
    lines += ["</tbody>", "</table>", "</section>"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The race of `regimen tune`
# --------------------------------------------------------------------------------------------


@dataclass
class RaceRow:
    """One candidate of a race: what it is, its loss at each rung (None: not run), where and why it stopped, its compute."""

    name: str
    what: str
    losses: list[float | None]
    stopped: str
    compute: float
    winner: bool = False


def race_section(
    rungs: Sequence[float],
    rows: Sequence[RaceRow],
    phases: Sequence[tuple[str, float, str]],
    unit: str,
    amount: str,
    figure: FigureFile | None,
) -> str:
    """The race of `regimen tune`: each candidate's rung results, where and why it stopped, the compute of each phase.

    `rungs` are the rung budgets and `phases` (name, compute, note) in `amount` units (samples or tokens).
    """
    heads = "".join(f"<th class='num'>rung {i}<br><small>{fmt_count(b)} {e(amount)}</small></th>" for i, b in enumerate(rungs))
    body = []
    for row in rows:
        cells = "".join(f"<td class='num'>{fmt_loss(v) if v is not None else '—'}</td>" for v in row.losses)
        cls = " class='winner'" if row.winner else ""
        badge = "<span class='badge winner'>★ best</span>" if row.winner else ""
        body.append(
            f"<tr data-run='{e(row.name)}'{cls}><td class='run'><code>{e(row.name)}</code>{badge}<br><small>{e(row.what)}</small></td>"
            f"{cells}<td>{e(row.stopped)}</td><td class='num'>{fmt_count(row.compute)}</td></tr>"
        )
    table = (
        f"<div class='scroll'><table class='race'><thead><tr><th>candidate</th>{heads}<th>stopped</th>"
        f"<th class='num'>compute ({e(amount)})</th></tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )
    total = sum(p[1] for p in phases) or 1.0
    phase_rows = "".join(
        f"<tr data-phase='{e(name)}'><td class='phase'>{e(name)}</td><td class='num'>{fmt_count(value)}</td>"
        f"<td class='num'>{value / total:.0%}</td><td class='muted'>{e(note)}</td></tr>"
        for name, value, note in phases
    )
    phase_table = (
        f"<div class='scroll'><table class='phases'><thead><tr><th>phase</th><th class='num'>compute ({e(amount)})</th>"
        f"<th class='num'>share</th><th>what it did</th></tr></thead><tbody>{phase_rows}</tbody></table></div>"
    )
    note = (
        f"Each candidate's validation loss ({e(unit)}) at the end of each rung it ran: a run of that length, measured on a cooldown "
        "branch of the candidate's stable phase (WSD), read from its run (constant schedules, schedule-free) or trained "
        "for that length (cosine). The best of each rung ran the next; the last rung is the full budget."
    )
    return (
        "<section id='race'><h2>The race</h2>"
        f"<p class='note'>{note}</p>{table}"
        f"<h2 style='margin-top:18px'>Compute by phase</h2>{phase_table}"
        f"{_figures([figure]) if figure is not None else ''}</section>"
    )
