import os
import sys

# Tests must never try to download weights.
os.environ['HF_HUB_OFFLINE'] = '1'
# Make the flat repo (util/, main_*.py) importable when running plain `pytest`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
