"""Mixture-ratio laws: fit D-CPT, CMR and Data Mixing laws to a sweep's results table and recommend a ratio.

``table`` loads the results, ``fit`` is the robust fitter they share, ``dcpt`` / ``cmr`` / ``mixing`` hold one
law each, ``plan`` turns a fit into a recommendation and a recipe snippet, ``plots`` draws fits, ``cli`` adds
``cpt fit-law`` and ``cpt plan``.
"""
