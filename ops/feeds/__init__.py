"""Market-data sources for `fintide feed` and the machinery they share.

* `pipeline`: symbols -> partition groups, the tick batcher (closes a batch at N ticks or
  T ms), the Kafka publisher, and `FeedPipeline`, which joins them with bounded buffers.
* `simulator`: multi-symbol geometric Brownian motion with Markov regime switching.
* `replay`: CSV replay of ticks or OHLCV bars with a speed factor.
* `binance`: Binance's public `trade` stream over WebSocket.

Every source pushes `TickChunk`s (arrays of symbol ids, event times, prices, sizes) into
a `FeedPipeline`; none knows about Kafka.
"""
