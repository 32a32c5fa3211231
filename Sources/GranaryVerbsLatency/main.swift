print("granary-verbs-latency: not yet")
