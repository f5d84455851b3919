"""Evidence a ROI chooses its settings by: synthetic defects (proxy.py) and the choice of views (views.py)."""
