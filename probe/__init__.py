"""probe: find attention heads that do specific jobs in a language model, and prove it causally.

The core (`probe.*`) loads models, addresses heads, applies interventions and stores results;
the analyzers live in `analyses`, the faces (CLI, Streamlit app) in `app`.
"""

__version__ = "0.1.0"
