"""Every benchmark, one module each; nothing is imported until a benchmark is asked for.

``run`` (``feddistill bench``: accuracy against bytes for centralized, local-only and federated
runs; its scenarios in ``spec``, dense-exchange costs in ``wirecost``), ``scale``
(``bench-scale``: the simulation's overhead against a plain loop), ``codec`` (``codec-bench``:
encode/decode speed and size), ``robust`` (``bench-robust``: aggregators under attack),
``privacy`` (``bench-privacy``) and ``serving`` (``bench-serve``: the exported student's size
and latency).
"""
