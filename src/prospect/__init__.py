"""ProSpect: attribute-aware personalization of diffusion models with the Prompt Spectrum.

Implements Zhang et al. (2023), "ProSpect: Prompt Spectrum for Attribute-Aware Personalization
of Diffusion Models", ACM TOG 42(6).
"""

__version__ = "0.1.0"
