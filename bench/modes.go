package main

// batchModes are the relay's --publish modes besides single that big-tx runs too.
var batchModes = []string{"atomic", "fast"}
