"""The callbacks' shared code: namespace-free ``...Base`` classes, one module each.

``lightning_nan._pytorch_lightning`` and ``lightning_nan.lightning`` write out the public classes
(``class NaNGuard(NaNGuardBase, Callback)``) against their own namespace's ``Callback``; a new
callback joins both namespaces by one class in each of those two modules.
"""
