"""Reports: one self-contained HTML page per run (:mod:`modelpress.report.html`)."""
