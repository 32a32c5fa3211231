/// Generates valid (strictly serializable) list-append histories by simulating a store: for
/// tests of the checker, and for timing it (`granary check generate`).
///
/// Each process loops: invoke a transaction, let it take effect atomically at a later step
/// (its linearization point), complete it at a still later step; the steps of all processes
/// interleave at random, so transactions overlap in real time. Some transactions fail (no
/// effect) and some end `info` (taking effect or not, at random); after an `info` the process
/// continues under a new id, as Jepsen's do.
public struct HistoryGenerator: Sendable {
    /// What to generate.
    public struct Configuration: Sendable {
        /// Transactions generated (invoked and completed).
        public var transactions: Int
        /// Concurrent client processes (each with at most one transaction in flight).
        public var processes: Int
        /// List-append keys, chosen uniformly.
        public var keys: Int
        /// Micro-ops per transaction: 1 to this.
        public var maxOpsPerTransaction: Int
        /// The chance that a micro-op is a read (else an append).
        public var readFraction: Double
        /// The chance that a transaction fails (takes no effect).
        public var failFraction: Double
        /// The chance that a transaction ends `info` (takes effect or not, at random).
        public var infoFraction: Double
        /// Nemesis events sprinkled through the history (they change nothing).
        public var nemesisEvents: Int
        /// The seed of the generator's random numbers: the same configuration gives the same history.
        public var seed: UInt64

        /// A configuration; each parameter sets the property of its name.
        ///
        /// - Parameters:
        ///   - transactions: transactions generated.
        ///   - processes: concurrent client processes.
        ///   - keys: list-append keys.
        ///   - maxOpsPerTransaction: the most micro-ops in one transaction.
        ///   - readFraction: the chance that a micro-op is a read.
        ///   - failFraction: the chance that a transaction fails.
        ///   - infoFraction: the chance that a transaction ends `info`.
        ///   - nemesisEvents: nemesis events in the history.
        ///   - seed: the seed of the random numbers.
        public init(transactions: Int = 1_000, processes: Int = 10, keys: Int = 100, maxOpsPerTransaction: Int = 4,
                    readFraction: Double = 0.5, failFraction: Double = 0.01, infoFraction: Double = 0.005,
                    nemesisEvents: Int = 0, seed: UInt64 = 1) {
            self.transactions = transactions
            self.processes = processes
            self.keys = keys
            self.maxOpsPerTransaction = maxOpsPerTransaction
            self.readFraction = readFraction
            self.failFraction = failFraction
            self.infoFraction = infoFraction
            self.nemesisEvents = nemesisEvents
            self.seed = seed
        }
    }

    /// What the generator makes: ``listAppend()`` reads it on every call.
    public var configuration: Configuration

    /// A generator of histories as `configuration` says.
    public init(_ configuration: Configuration) {
        self.configuration = configuration
    }

    /// The history's operations (indices 0, 1, ...; times increasing).
    /// - Complexity: O(transactions + elements read): lists grow to about
    ///   transactions × maxOps / (4 × keys) elements.
    public func listAppend() -> [HistoryOperation] {
        let config = configuration
        var random = SplitMix64(seed: config.seed)
        var store = [[Int]](repeating: [], count: max(1, config.keys))
        var nextValue = 1
        enum Outcome { case ok, fail, info }
        struct Slot {
            var process: Int
            var stage = 0  // 0 idle, 1 invoked, 2 took effect
            var ops: [MicroOp] = []
            var done: [MicroOp] = []
            var outcome = Outcome.ok
        }
        var slots = (0..<max(1, config.processes)).map { Slot(process: $0) }
        var operations: [HistoryOperation] = []
        operations.reserveCapacity(2 * config.transactions + config.nemesisEvents)
        var time = 1_000_000
        var invoked = 0
        var completed = 0
        let nemesisEvery = config.nemesisEvents > 0 ? max(1, config.transactions / config.nemesisEvents) : Int.max
        var nemesisDone = 0
        while completed < config.transactions {
            time += Int(random.next() % 1000) + 1
            let which = Int(random.next() % UInt64(slots.count))
            var slot = slots[which]
            switch slot.stage {
            case 0:
                guard invoked < config.transactions else { continue }
                invoked += 1
                let count = 1 + Int(random.next() % UInt64(max(1, config.maxOpsPerTransaction)))
                slot.ops = (0..<count).map { _ in
                    let key = Int(random.next() % UInt64(store.count))
                    if random.unit() < config.readFraction { return .read(key: key, value: nil) }
                    defer { nextValue += 1 }
                    return .append(key: key, value: nextValue)
                }
                let roll = random.unit()
                slot.outcome = roll < config.failFraction ? .fail : roll < config.failFraction + config.infoFraction ? .info : .ok
                slot.stage = 1
                operations.append(.transaction(index: operations.count, process: slot.process, type: .invoke, ops: slot.ops, time: time))
            case 1:
                // The linearization point: apply atomically (or not at all).
                let applies = slot.outcome == .ok || (slot.outcome == .info && random.next() % 2 == 0)
                if applies {
                    slot.done = slot.ops.map { op in
                        switch op {
                        case .append(let key, let value):
                            store[key].append(value)
                            return op
                        case .read(let key, _):
                            return .read(key: key, value: .list(store[key]))
                        case .write:
                            return op
                        }
                    }
                }
                slot.stage = 2
            default:
                switch slot.outcome {
                case .ok:
                    operations.append(.transaction(index: operations.count, process: slot.process, type: .ok, ops: slot.done, time: time))
                case .fail:
                    operations.append(.transaction(index: operations.count, process: slot.process, type: .fail, ops: slot.ops, time: time))
                case .info:
                    operations.append(.transaction(index: operations.count, process: slot.process, type: .info, ops: slot.ops, time: time))
                    slot.process += slots.count
                }
                slot.stage = 0
                slot.done = []
                completed += 1
                if completed % nemesisEvery == 0, nemesisDone < config.nemesisEvents {
                    nemesisDone += 1
                    time += 1
                    let node = Int(random.next() % 3)
                    operations.append(.nemesis(index: operations.count, f: nemesisDone % 2 == 1 ? "crash" : "restart", value: .int(node), time: time))
                }
            }
            slots[which] = slot
        }
        return operations
    }
}

/// A small, fast, seedable generator (SplitMix64), so generated histories are reproducible.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64

    /// A generator whose sequence is fixed by `seed` (any value, 0 included).
    public init(seed: UInt64) {
        state = seed
    }

    /// The next 64 random bits of the sequence.
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A uniform double in [0, 1).
    mutating func unit() -> Double {
        Double(next() >> 11) / Double(1 << 53)
    }
}
