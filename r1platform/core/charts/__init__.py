"""Server-rendered SVG charts: no JavaScript, no external assets, every piece of text escaped.

``svg`` holds the shared primitives (geometry, palette, number formatting, a panel's frame, the
legend); each other module draws one family of charts: ``benchmarks`` (latency and throughput by
batch size, and by version), ``serving`` (a pool's traffic, errors and latency over time) and
``parity`` (the certification's error histogram).
"""
