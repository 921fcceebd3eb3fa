"""Reading results: terminal tables, report.md with the paper's tables and figures, HTML, comparisons."""
