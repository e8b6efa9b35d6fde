"""transfer-learning"""

__version__ = "0.1"
