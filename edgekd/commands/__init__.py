"""Commands that stand beside ``compress``: ``edgekd benchmark`` (time files, write a report) and
``edgekd report`` (render a run's report again). They compose the benchmark library and the report
builder, so they sit at the top with ``cli`` and ``api`` (see the layers contract in pyproject.toml).
"""
