"""Small trained models on which the library's readings can be checked against a known mechanism.

``induction``: a 2-layer attention-only transformer trained on random tokens repeated twice
(Olsson et al. 2022), whose weights ship with the package.
"""
