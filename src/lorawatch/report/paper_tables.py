"""The paper's Tables 3-6 from a study: display cells for Markdown and LaTeX, numbers for CSV."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from tabulate import tabulate

from lorawatch.report.labels import METRIC_HEADERS, TRANSFER_METRICS, mean_sd
from lorawatch.report.study import ORDER_RANK, StudyResults



@dataclass
class ReportTable:
    """One of the paper's tables: display cells for Markdown/LaTeX and a numeric frame for CSV."""

    name: str                   # file stem, e.g. "table4"
    title: str
    headers: list[str]
    rows: list[list[str]]       # display cells; the model name only on the first row of its block
    block_starts: list[int]     # row indices where a model's block starts
    data: pd.DataFrame          # numbers (mean and *_std columns); undefined = empty in the CSV
    note: str = ""
    header_groups: list[tuple[str, int]] | None = None  # (label, span) above the headers, for LaTeX

    def to_markdown(self) -> str:
        headers = self.headers
        if self.header_groups:
            # Markdown has one header row: fold the group label into each column header
            folded, col = [], 0
            for label, span in self.header_groups:
                for h in headers[col:col + span]:
                    folded.append(f"{label}: {h}" if label else h)
                col += span
            headers = folded
        align = ["left" if i < self.label_columns else "right" for i in range(len(headers))]
        rows = [[c.replace("|", "\\|") for c in row] for row in self.rows]
        return tabulate(rows, headers, tablefmt="pipe", colalign=align, disable_numparse=True) + "\n"

    def to_latex(self) -> str:
        n = len(self.headers)
        spec = "l" * self.label_columns + "r" * (n - self.label_columns)
        out = ["% " + _latex(self.title) + " (needs \\usepackage{booktabs})",
               "\\begin{tabular}{" + spec + "}", "\\toprule"]
        if self.header_groups:
            cells, rules, col = [], [], 1
            for label, span in self.header_groups:
                cells.append(f"\\multicolumn{{{span}}}{{c}}{{{_latex(label)}}}" if span > 1 else _latex(label))
                if label and span > 1:
                    rules.append(f"\\cmidrule(lr){{{col}-{col + span - 1}}}")
                col += span
            out.append(" & ".join(cells) + " \\\\")
            out.extend(rules)
        out.append(" & ".join(_latex(h) for h in self.headers) + " \\\\")
        out.append("\\midrule")
        for i, row in enumerate(self.rows):
            if i in self.block_starts and i > 0:
                out.append("\\midrule")
            out.append(" & ".join(_latex(c) for c in row) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(out) + "\n"

    def to_csv(self) -> str:
        return self.data.to_csv(index=False, float_format="%.10g")

    @property
    def label_columns(self) -> int:
        # leading text columns (model, order, step, task...) are left-aligned
        return sum(1 for h in self.headers if h in _TEXT_HEADERS)


_TEXT_HEADERS = {"Model", "Order", "Step", "Learned task", "Checkpoint"}

_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "—": "---",
          "Δ": r"$\Delta$", "→": r"$\rightarrow$", "·": r"$\cdot$", "−": "-"}


def _latex(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in str(text))


def _per_step_table(study: StudyResults, name: str, title: str, note: str, headers: list[str],
                    columns: list[tuple[str, str]], learned_task_column: bool) -> ReportTable:
    """Rows: every group, steps 1..T. `columns` = (step column, CSV name)."""
    with_order = len(study.orders) > 1
    shown = ["Model"] + (["Order"] if with_order else []) + ["Step"] + \
        (["Learned task"] if learned_task_column else ["Checkpoint"]) + headers
    rows, starts, records = [], [], []
    for group in study.groups:
        multi = len(group.per_seed) > 1
        starts.append(len(rows))
        for k, task in enumerate(group.tasks, start=1):
            mean, std = group.mean.iloc[k], group.std.iloc[k]
            first = k == 1
            row = [group.model if first else ""] + ([group.order if first else ""] if with_order else [])
            row += [str(k), task if learned_task_column else f"After {task}"]
            row += [mean_sd(mean[c], std[c] if multi else None) for c, _ in columns]
            rows.append(row)
            record = {"model": group.model, "spec": group.spec, "order": group.order, "step": k,
                      "checkpoint": task, "n_seeds": len(group.per_seed)}
            for c, csv_name in columns:
                record[csv_name] = mean[c]
                record[f"{csv_name}_std"] = std[c]
            records.append(record)
    return ReportTable(name, title, shown, rows, starts, pd.DataFrame(records), note)


def _seeds_note(study: StudyResults) -> str:
    counts = sorted({len(g.per_seed) for g in study.groups})
    if counts == [1]:
        return "one seed per model and order"
    note = "mean ± std over seeds (sample std, ddof = 1)"
    return note if counts[0] > 1 else note + "; one-seed rows show the mean only"


def table3(study: StudyResults) -> ReportTable:
    return _per_step_table(
        study, "table3", "Table 3: sequential adaptation per model and step",
        "After learning = R[k,k]; immediate gain = R[k,k] − R[k−1,k]; vs. base = R[k,k] − R[0,k]; "
        "average accuracy = mean over all tasks of R[k,·]; " + _seeds_note(study) + ".",
        ["After learning", "Immediate gain", "vs. Base", "Average accuracy"],
        [("learned_acc", "after_learning"), ("gain", "immediate_gain"), ("delta_vs_base", "vs_base"),
         ("avg_all", "avg_accuracy")], learned_task_column=True)


def table4(study: StudyResults) -> ReportTable:
    return _per_step_table(
        study, "table4", "Table 4: continual-learning metrics per checkpoint",
        "OP_k = mean_{i≤k} R[k,i]; BWT_k = mean_{i<k} (R[k,i] − R[i,i]); FWT_k = mean_{i>k} (R[k,i] − R[0,i]); "
        "— where undefined (BWT after the first task, FWT after the last); " + _seeds_note(study) + ".",
        [METRIC_HEADERS[m] for m in TRANSFER_METRICS], [(m, m) for m in TRANSFER_METRICS], learned_task_column=False)


def table5(study: StudyResults) -> ReportTable:
    return _per_step_table(
        study, "table5", "Table 5: stability on the reference set, relative to the base checkpoint",
        "Δ entropy and Δ margin: mean over the reference set minus the base checkpoint's; KL to base: mean "
        "KL(checkpoint ‖ base) of the next-token distribution; " + _seeds_note(study) + ".",
        ["Δ Entropy", "Δ Margin", "KL to Base"],
        [("entropy_mean_delta", "entropy_delta"), ("margin_mean_delta", "margin_delta"), ("kl_mean", "kl_to_base")],
        learned_task_column=False)


def table6(study: StudyResults) -> ReportTable:
    orders = study.orders
    headers = ["Model"] + [o.capitalize() if o in ORDER_RANK else o for o in orders] * 2
    rows, records = [], []
    for model in study.models:
        row_acc, row_kl = [], []
        for order in orders:
            group = study.group(model, order)
            if group is None:
                row_acc.append("—")
                row_kl.append("—")
                continue
            multi = len(group.per_seed) > 1
            mean, std = group.mean.iloc[-1], group.std.iloc[-1]
            row_acc.append(mean_sd(mean["avg_all"], std["avg_all"] if multi else None))
            row_kl.append(mean_sd(mean["kl_mean"], std["kl_mean"] if multi else None))
            records.append({"model": model, "spec": group.spec, "order": order,
                            "tasks": " > ".join(group.tasks), "n_seeds": len(group.per_seed),
                            "final_avg_accuracy": mean["avg_all"], "final_avg_accuracy_std": std["avg_all"],
                            "final_kl_to_base": mean["kl_mean"], "final_kl_to_base_std": std["kl_mean"]})
        rows.append([model] + row_acc + row_kl)
    groups = [("", 1), ("Final Average Accuracy", len(orders)), ("Final KL to Base (Drift)", len(orders))]
    return ReportTable("table6", "Table 6: final results per task order",
                       headers, rows, [0], pd.DataFrame(records),
                       "Final average accuracy = mean over all tasks after the last step; final KL to base = mean "
                       "KL on the reference set after the last step; " + _seeds_note(study) + ".",
                       header_groups=groups)


def build_tables(study: StudyResults) -> list[ReportTable]:
    return [table3(study), table4(study), table5(study), table6(study)]


