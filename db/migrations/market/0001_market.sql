-- Market: instruments, closed bars (1m and coarser), signals, their outcomes, and which
-- symbols each user follows. Written by the market worker's persistence agents in batches,
-- idempotently (ON CONFLICT DO NOTHING on natural keys), read by api/market.py.
-- Times are epoch milliseconds (bigint), the unit of every market event.

CREATE TABLE market.instruments (
    symbol         text             PRIMARY KEY CHECK (char_length(symbol) BETWEEN 1 AND 64),
    first_bar_ms   bigint           NOT NULL,
    last_bar_ms    bigint           NOT NULL,
    last_close     double precision NOT NULL,
    updated_at     timestamptz      NOT NULL DEFAULT now()
);

CREATE TABLE market.bars (
    symbol      text             NOT NULL,
    interval    text             NOT NULL CHECK (interval IN ('1s', '1m', '5m', '1h')),
    open_ts_ms  bigint           NOT NULL,
    open        double precision NOT NULL,
    high        double precision NOT NULL,
    low         double precision NOT NULL,
    close       double precision NOT NULL,
    volume      double precision NOT NULL CHECK (volume >= 0),
    n_ticks     integer          NOT NULL CHECK (n_ticks > 0),
    PRIMARY KEY (symbol, interval, open_ts_ms),
    CHECK (low <= open AND low <= close AND high >= open AND high >= close)
);

CREATE TABLE market.signals (
    -- "{symbol}:{interval}:{bar open_ts_ms}:{strategy}": replays produce the same id.
    signal_id     text             PRIMARY KEY,
    event_id      uuid             NOT NULL,
    symbol        text             NOT NULL,
    interval      text             NOT NULL,
    signal_ts_ms  bigint           NOT NULL,
    action        text             NOT NULL CHECK (action IN ('buy', 'sell')),
    price         double precision NOT NULL CHECK (price > 0),
    price_target  double precision NOT NULL,
    stop_loss     double precision NOT NULL,
    confidence    double precision NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    strategy      text             NOT NULL,
    indicators    jsonb            NOT NULL,
    created_at    timestamptz      NOT NULL DEFAULT now()
);
-- History pages: newest first, per symbol or across symbols.
CREATE INDEX signals_by_symbol_time ON market.signals (symbol, signal_ts_ms DESC, signal_id DESC);
CREATE INDEX signals_by_time ON market.signals (signal_ts_ms DESC, signal_id DESC);

CREATE TABLE market.signal_outcomes (
    signal_id        text             NOT NULL,
    horizon_bars     integer          NOT NULL CHECK (horizon_bars > 0),
    symbol           text             NOT NULL,
    interval         text             NOT NULL,
    strategy         text             NOT NULL,
    action           text             NOT NULL CHECK (action IN ('buy', 'sell')),
    realised_return  double precision NOT NULL,
    hit              boolean          NOT NULL,
    exit             text             NOT NULL CHECK (exit IN ('target', 'stop', 'horizon')),
    resolved_ts_ms   bigint           NOT NULL,
    PRIMARY KEY (signal_id, horizon_bars),
    CHECK (hit = (realised_return > 0))
);
-- Performance per strategy / symbol / horizon, in resolution order (drawdown).
CREATE INDEX outcomes_for_performance
    ON market.signal_outcomes (strategy, symbol, interval, horizon_bars, resolved_ts_ms, signal_id);
CREATE INDEX outcomes_by_symbol ON market.signal_outcomes (symbol, horizon_bars);

CREATE TABLE market.subscriptions (
    user_id     uuid        NOT NULL,
    symbol      text        NOT NULL CHECK (char_length(symbol) BETWEEN 1 AND 64),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, symbol)
);
