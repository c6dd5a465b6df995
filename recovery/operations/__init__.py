"""What an operator does to a parked letter: replay, discard, resolve, compensate, and
the bulk runs of each. The one service both the admin and ``manage.py dlq`` call.
"""
