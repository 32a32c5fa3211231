import Foundation

/// One micro-operation of a transaction, as Elle's list-append and rw-register workloads have them.
///
/// In an `invoke`, reads carry `nil`; in the `ok` completion they carry what was read.
/// JSON: `["append", key, value]`, `["w", key, value]`, `["r", key, value-or-null]`.
public enum MicroOp: Sendable, Hashable, CustomStringConvertible {
    /// list-append: append `value` to the list at `key`.
    case append(key: Int, value: Int)
    /// rw-register: set the register at `key` to `value`.
    case write(key: Int, value: Int)
    /// A read of `key`: `nil` before it ran (in an invoke), or when it read nothing (an empty
    /// list, a register never written); `.list` for a list-append key, `.register` for a
    /// register.
    case read(key: Int, value: ReadValue?)

    /// The key the micro-op touches.
    public var key: Int {
        switch self {
        case .append(let key, _), .write(let key, _), .read(let key, _): key
        }
    }

    /// The micro-op as JSON text, e.g. `["append", 3, 7]` (long lists shortened when `abbreviated`).
    public func text(abbreviated: Bool) -> String {
        switch self {
        case .append(let key, let value): return "[\"append\", \(key), \(value)]"
        case .write(let key, let value): return "[\"w\", \(key), \(value)]"
        case .read(let key, nil): return "[\"r\", \(key), null]"
        case .read(let key, .register(let value)): return "[\"r\", \(key), \(value)]"
        case .read(let key, .list(let list)):
            return "[\"r\", \(key), \(abbreviated ? renderList(list) : "[" + list.map(String.init).joined(separator: ", ") + "]")]"
        }
    }

    /// The micro-op as JSON text, long lists shortened (``text(abbreviated:)``).
    public var description: String { text(abbreviated: true) }
}

/// What a read returned: a list (list-append) or a register's value (rw-register).
public enum ReadValue: Sendable, Hashable {
    /// The list at a list-append key, in append order.
    case list([Int])
    /// The value of an rw-register.
    case register(Int)
}

/// An operation's type: `invoke`, then one of `ok` (committed), `fail` (certainly not
/// committed) or `info` (outcome unknown).
public enum OperationType: String, Sendable, Hashable, Codable, CaseIterable {
    /// One of `invoke` (a transaction begins), `ok` (it committed), `fail` (it certainly did not)
    /// or `info` (its outcome is unknown; also a nemesis event).
    case invoke, ok, fail, info
}

/// Who performed an operation: a client process (an integer id) or the nemesis (fault injection).
public enum HistoryProcess: Sendable, Hashable, CustomStringConvertible {
    /// A client process, by its id.
    case client(Int)
    /// The nemesis: the fault injector, whose events are reported but not checked.
    case nemesis

    /// The client's id as a number, or `nemesis`, as the history's `process` field holds it.
    public var description: String {
        switch self {
        case .client(let id): "\(id)"
        case .nemesis: "nemesis"
        }
    }
}

/// An operation's value: a transaction's micro-ops, or any JSON (a nemesis event's argument, or
/// `null` for a completion that carries no value).
public enum OperationValue: Sendable, Hashable {
    /// A client transaction's micro-ops.
    case transaction([MicroOp])
    /// Any other value: a nemesis event's argument, or `null` for a completion without a value.
    case json(JSONValue)
}

/// One line of a history: `{"index": 7, "process": 2, "type": "invoke", "f": "txn",
/// "value": [["append", 5, 12], ["r", 7, null]], "time": 123456789}`.
///
/// The in-memory form of a history line, so a runner can build a ``History`` and check it
/// without writing a file.
public struct HistoryOperation: Sendable, Hashable {
    /// The operation's position in the history (unique; increasing in the order recorded).
    public var index: Int
    /// A client process's id, or the nemesis.
    public var process: HistoryProcess
    /// `invoke`, or the completion's outcome.
    public var type: OperationType
    /// `"txn"` for transactions; the fault's name for the nemesis (`"crash"`, `"restart"`, ...).
    public var f: String
    /// The micro-ops (a client's), or any JSON (the nemesis's; null for a completion without a value).
    public var value: OperationValue
    /// Monotonic nanoseconds.
    public var time: Int

    /// An operation with the given fields; ``transaction(index:process:type:ops:time:)`` and
    /// ``nemesis(index:type:f:value:time:)`` build the two usual kinds.
    ///
    /// - Parameters:
    ///   - index: the operation's position in the history.
    ///   - process: the client process, or the nemesis.
    ///   - type: `invoke`, or the completion's outcome.
    ///   - f: `"txn"` for a transaction; the fault's name for the nemesis.
    ///   - value: the micro-ops, or any JSON.
    ///   - time: monotonic nanoseconds.
    public init(index: Int, process: HistoryProcess, type: OperationType, f: String, value: OperationValue, time: Int) {
        self.index = index
        self.process = process
        self.type = type
        self.f = f
        self.value = value
        self.time = time
    }

    /// A transaction operation of client `process`.
    public static func transaction(index: Int, process: Int, type: OperationType, ops: [MicroOp], time: Int) -> HistoryOperation {
        HistoryOperation(index: index, process: .client(process), type: type, f: "txn", value: .transaction(ops), time: time)
    }

    /// A nemesis event (`type` is usually `info`).
    public static func nemesis(index: Int, type: OperationType = .info, f: String, value: JSONValue = .null, time: Int) -> HistoryOperation {
        HistoryOperation(index: index, process: .nemesis, type: type, f: f, value: .json(value), time: time)
    }

    /// The micro-ops, when the value is a transaction's.
    public var microOps: [MicroOp]? {
        if case .transaction(let ops) = value { return ops }
        return nil
    }

    /// The operation as one JSON line (no newline), in the history format.
    public var jsonLine: String {
        var bytes: [UInt8] = []
        HistoryCoding.appendLine(self, to: &bytes)
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// A transaction's outcome.
public enum TransactionStatus: String, Sendable, Hashable, Codable {
    /// Committed: its reads carry the values read.
    case ok
    /// Certainly not committed.
    case fail
    /// Unknown: it may or may not have committed (also a transaction never completed).
    case info
}

/// A transaction: an invoke paired with its process's next completion.
public struct HistoryTransaction: Sendable, Hashable {
    /// Position in ``History/transactions``.
    public var id: Int
    /// The client process that ran it.
    public var process: Int
    /// Its invoke (the transaction is named after the invoke's index).
    public var invoke: HistoryOperation
    /// `nil` when the history ended before the transaction completed (counted as `info`).
    public var completion: HistoryOperation?
    /// The completion's outcome; `info` when it never completed.
    public var status: TransactionStatus
    /// The completion's micro-ops for an `ok` transaction (reads carry values); the invoke's
    /// otherwise (a `fail` or `info` completion that repeats them changes nothing).
    public var ops: [MicroOp]

    /// The transaction's name in reports: `T` and its invoke's index.
    public var name: String { "T\(invoke.index)" }
    /// When it was invoked (monotonic nanoseconds): it took effect no earlier.
    public var invokeTime: Int { invoke.time }
    /// Completion time for an `ok` or `fail` transaction; `nil` for `info` (it may take effect
    /// any time after its invoke).
    public var completionTime: Int? { status == .info ? nil : completion?.time }
}

/// A malformed history: which line (of a file) or operation index, and what is wrong.
public struct HistoryError: Error, Sendable, CustomStringConvertible, Equatable {
    /// The file, when one was read.
    public var file: String?
    /// 1-based line number, when the history came from text.
    public var line: Int?
    /// The operation's index, when known and no line is.
    public var index: Int?
    /// What is wrong, in a sentence.
    public var message: String

    /// An error saying `message` about a place in a history: its file, line or operation index,
    /// each when known.
    ///
    /// - Parameters:
    ///   - file: the file the history was read from.
    ///   - line: the 1-based line number in it.
    ///   - index: the operation's index, when no line is known.
    ///   - message: what is wrong.
    public init(file: String? = nil, line: Int? = nil, index: Int? = nil, message: String) {
        self.file = file
        self.line = line
        self.index = index
        self.message = message
    }

    /// `<file>:<line>: <message>`, or `<file>, operation <index>: <message>` when no line is
    /// known (`history` in place of a file when there is none).
    public var description: String {
        var place = file ?? "history"
        if let line {
            place += ":\(line)"
        } else if let index {
            place += ", operation \(index)"
        }
        return "\(place): \(message)"
    }
}

/// A history: the operations in order, paired into transactions, plus the nemesis events.
///
/// Built from in-memory operations with ``init(operations:)`` or from JSON Lines with
/// ``parse(_:file:)`` / ``load(path:)``; both validate the pairing the same way.
public struct History: Sendable {
    /// The operations, in the order given.
    public let operations: [HistoryOperation]
    /// Client transactions, ordered by their invokes.
    public let transactions: [HistoryTransaction]
    /// The nemesis's operations (faults): reported, not checked.
    public let nemesisEvents: [HistoryOperation]

    /// Pairs `operations` into transactions.
    ///
    /// Each client `invoke` is completed by the same process's next `ok`, `fail` or `info`; an
    /// invoke left open at the end counts as `info`. A process may invoke again after an `info`.
    /// - Throws: ``HistoryError`` naming the operation's index: a completion without a pending
    ///   invoke, an invoke while the process's previous one is pending, a client operation whose
    ///   value is not a list of micro-ops, an `ok` completion without micro-ops.
    /// - Complexity: O(n) in the number of operations.
    public init(operations: [HistoryOperation]) throws(HistoryError) {
        try self.init(operations: operations, lines: nil, file: nil)
    }

    init(operations: [HistoryOperation], lines: [Int]?, file: String?) throws(HistoryError) {
        func failure(_ position: Int, _ message: String) -> HistoryError {
            if let lines { return HistoryError(file: file, line: lines[position], message: message) }
            return HistoryError(file: file, index: operations[position].index, message: message)
        }
        var transactions: [HistoryTransaction] = []
        var nemesis: [HistoryOperation] = []
        var pending: [Int: (transaction: Int, position: Int)] = [:]  // process → its open invoke
        transactions.reserveCapacity(operations.count / 2 + 1)
        for (position, operation) in operations.enumerated() {
            guard case .client(let process) = operation.process else {
                nemesis.append(operation)
                continue
            }
            switch operation.type {
            case .invoke:
                guard case .transaction(let ops) = operation.value else {
                    throw failure(position, "an invoke of process \(process) whose value is not a list of micro-ops")
                }
                if let open = pending[process] {
                    let previous = lines.map { "line \($0[open.position])" } ?? "index \(operations[open.position].index)"
                    throw failure(position, "process \(process) invokes again while its invoke at \(previous) is pending (a process has at most one outstanding invoke)")
                }
                pending[process] = (transactions.count, position)
                transactions.append(HistoryTransaction(id: transactions.count, process: process, invoke: operation, completion: nil, status: .info, ops: ops))
            case .ok, .fail, .info:
                guard let open = pending.removeValue(forKey: process)?.transaction else {
                    throw failure(position, "\(operation.type.rawValue) of process \(process) without a pending invoke")
                }
                var transaction = transactions[open]
                transaction.completion = operation
                transaction.status = TransactionStatus(rawValue: operation.type.rawValue)!
                switch operation.value {
                case .transaction(let ops):
                    if operation.type == .ok {
                        transaction.ops = ops
                    }
                case .json(.null):
                    if operation.type == .ok {
                        throw failure(position, "an ok of process \(process) without its micro-ops (value is null)")
                    }
                case .json:
                    throw failure(position, "a completion of process \(process) whose value is not a list of micro-ops")
                }
                transactions[open] = transaction
            }
        }
        self.operations = operations
        self.transactions = transactions
        self.nemesisEvents = nemesis
    }
}

/// A list for a human: all of a short one, the ends of a long one.
func renderList(_ list: [Int]) -> String {
    if list.count <= 8 { return "[" + list.map(String.init).joined(separator: ", ") + "]" }
    let head = list.prefix(3).map(String.init).joined(separator: ", ")
    let tail = list.suffix(3).map(String.init).joined(separator: ", ")
    return "[\(head), ... (\(list.count) elements) ..., \(tail)]"
}
