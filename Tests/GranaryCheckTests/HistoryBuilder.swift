import GranaryCheck

/// Builds small histories by hand: invocations and completions in the order written, with
/// times 10, 20, 30, ... so that the order written is the real-time order.
struct HistoryBuilder {
    private(set) var operations: [HistoryOperation] = []
    private var time = 0
    private var pending: [Int: [MicroOp]] = [:]

    /// Records `process`'s invoke of `ops` (reads recorded with null) and returns its index,
    /// which names the transaction (`T<index>`). The completion carries `ops` as given.
    @discardableResult
    mutating func invoke(_ process: Int, _ ops: [MicroOp]) -> Int {
        time += 10
        pending[process] = ops
        let index = operations.count
        operations.append(.transaction(index: index, process: process, type: .invoke, ops: ops.map(\.invoked), time: time))
        return index
    }

    mutating func complete(_ process: Int, _ type: OperationType) {
        time += 10
        let ops = pending.removeValue(forKey: process)!
        operations.append(.transaction(index: operations.count, process: process, type: type,
                                       ops: type == .ok ? ops : ops.map(\.invoked), time: time))
    }

    mutating func ok(_ process: Int) { complete(process, .ok) }
    mutating func fail(_ process: Int) { complete(process, .fail) }
    mutating func info(_ process: Int) { complete(process, .info) }

    /// A transaction invoked and completed at once (serially); returns its index.
    @discardableResult
    mutating func txn(_ process: Int, _ ops: [MicroOp], _ type: OperationType = .ok) -> Int {
        let index = invoke(process, ops)
        complete(process, type)
        return index
    }

    mutating func nemesis(_ f: String, _ value: JSONValue = .null) {
        time += 10
        operations.append(.nemesis(index: operations.count, f: f, value: value, time: time))
    }

    func history() throws -> History { try History(operations: operations) }

    func check(maxExamples: Int = 5) throws -> CheckReport {
        GranaryCheck.check(history: try history(), options: CheckOptions(maxExamples: maxExamples))
    }
}

extension MicroOp {
    /// As in an invoke: reads carry null.
    var invoked: MicroOp {
        if case .read(let key, _) = self { return .read(key: key, value: nil) }
        return self
    }
}

func append(_ key: Int, _ value: Int) -> MicroOp { .append(key: key, value: value) }
func read(_ key: Int, _ list: [Int]) -> MicroOp { .read(key: key, value: .list(list)) }
func write(_ key: Int, _ value: Int) -> MicroOp { .write(key: key, value: value) }
func readRegister(_ key: Int, _ value: Int?) -> MicroOp { .read(key: key, value: value.map { .register($0) }) }

extension CheckReport {
    /// The classes found, as a set.
    var kinds: Set<AnomalyKind> { Set(anomalyKinds) }

    /// The transactions of the first example of `kind`, as a set of invoke indices.
    func involved(_ kind: AnomalyKind) -> Set<Int> { Set(anomalies[kind]?.first?.indices ?? []) }
}
