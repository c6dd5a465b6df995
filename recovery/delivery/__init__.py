"""The worker side: the consumer that parks poison, the request class, visibility
extension, the housekeeping bootstep, the hand-back of unused deliveries and the
live-worker stamp. Imports the store, workflows and core; never observe.
"""
