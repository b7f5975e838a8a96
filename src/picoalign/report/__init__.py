"""The results folder of a run: `build_report(run_dir)` in build.py writes `run_dir/report/`.

load.py reads the run folder, plots.py draws the charts, sections.py and strings.py write the
Markdown in English and Chinese, html.py turns it into one self-contained page.
"""
