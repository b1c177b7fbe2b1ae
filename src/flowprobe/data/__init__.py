"""Sources and targets: samplers with ``sample(n, generator) -> (x, idx)`` (the ``Sampler`` protocol of
:mod:`flowprobe.couplings`).

Kept minimal on purpose: import the submodule you need (``flowprobe.data.toy`` for 2-D distributions);
image datasets live in their own submodule so that importing ``flowprobe.data`` stays light.
"""
