"""Text: the shipped calibration and evaluation samples (calib_sample.txt, eval_sample.txt) and text -> token
windows (windows.py), for calibration, verify and perplexity.

May import only the root helpers.
"""
