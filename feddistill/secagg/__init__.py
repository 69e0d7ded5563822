"""Secure aggregation that keeps the compression (issue 18): the pure core.

:mod:`feddistill.secagg.quantize` puts a round's compressed updates in one finite group (a
shared random-k pattern, clipping, stochastic rounding into ``Z_{2^m}``);
:mod:`feddistill.secagg.protocol` masks them so the server learns only their sum (SecAgg+).
Not yet wired into the apps: no config key reaches this code.
"""
