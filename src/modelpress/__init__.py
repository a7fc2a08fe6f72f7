"""modelpress: shrink Hugging Face language models to fit the hardware you have.

Plan the deployment arithmetic, quantize, evaluate what it cost, export to the engines.
"""

__version__ = "0.1.0"
