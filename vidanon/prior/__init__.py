"""The bundled offline face prior: data, training, export and its weights (``weights/``).

Submodules are imported explicitly (``vidanon.prior.train`` etc.) so that importing the
package stays cheap for code that only needs ``weights/``.
"""
