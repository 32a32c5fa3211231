import Foundation
import GranaryCheck
import Testing

/// A generated 100,000-transaction list-append history (100 keys, 1-4 micro-ops each): valid
/// as generated; each corruption is found.
@Suite("A 100,000-transaction history")
struct LargeHistoryTests {
    static let operations = HistoryGenerator(.init(transactions: 100_000, processes: 10, keys: 100, nemesisEvents: 10)).listAppend()

    /// The operation positions of ok completions, each with its invoke's position.
    static func okTransactions(_ operations: [HistoryOperation]) -> [(invoke: Int, ok: Int)] {
        var open: [HistoryProcess: Int] = [:]
        var result: [(Int, Int)] = []
        for (position, operation) in operations.enumerated() where operation.process != .nemesis {
            if operation.type == .invoke {
                open[operation.process] = position
            } else if let invoke = open.removeValue(forKey: operation.process), operation.type == .ok {
                result.append((invoke, position))
            }
        }
        return result
    }

    func timedCheck(_ operations: [HistoryOperation], _ label: String) throws -> CheckReport {
        let history = try History(operations: operations)
        let start = ContinuousClock.now
        let report = check(history: history)
        print("checking the \(label) 100k-transaction history took \(ContinuousClock.now - start)")
        return report
    }

    @Test("the generated history is valid")
    func valid() throws {
        let report = try timedCheck(Self.operations, "generated")
        #expect(report.isValid, "\(report)")
        #expect(report.okCount + report.failCount + report.infoCount == 100_000)
        #expect(report.listAppendKeyCount == 100)
        #expect(report.nemesisCount == 10)
    }

    @Test("swapping two elements of one read is an incompatible order")
    func swapped() throws {
        var operations = Self.operations
        let transactions = Self.okTransactions(operations)
        var corrupted: Int?
        search: for (_, ok) in transactions[(transactions.count / 2)...] {
            guard case .transaction(var ops) = operations[ok].value else { continue }
            for (position, op) in ops.enumerated() {
                if case .read(let key, .list(var list)) = op, list.count >= 10 {
                    list.swapAt(list.count - 3, list.count - 4)
                    ops[position] = .read(key: key, value: .list(list))
                    operations[ok].value = .transaction(ops)
                    corrupted = operations[transactions.first { $0.ok == ok }!.invoke].index
                    break search
                }
            }
        }
        let reader = try #require(corrupted)
        let report = try timedCheck(operations, "swapped")
        #expect(report.kinds.contains(.incompatibleOrder))
        #expect(report.anomalies[.incompatibleOrder]?.contains { $0.indices.contains(reader) } == true)
    }

    /// Drops the last element of a read taken after that element's transaction completed (and
    /// before other reads show it): the reader now precedes the appender (rw) though it began
    /// after the appender ended (realtime), a G-single-realtime cycle (or a plain G-single if
    /// value edges alone close it).
    @Test("dropping the last element of a late read is a stale read")
    func stale() throws {
        var operations = Self.operations
        let transactions = Self.okTransactions(operations)
        // Who appended each (key, value), and when it completed.
        var appender: [Int: (index: Int, completed: Int)] = [:]
        for (invoke, ok) in transactions {
            for case .append(let key, let value) in operations[ok].microOps ?? [] {
                appender[key << 32 | value] = (operations[invoke].index, operations[ok].time)
            }
        }
        var corrupted: (reader: Int, writer: Int)?
        search: for (invoke, ok) in transactions[(transactions.count / 2)...] {
            guard var ops = operations[ok].microOps else { continue }
            for (position, op) in ops.enumerated() {
                guard case .read(let key, .list(let list)) = op, let last = list.last,
                      !ops.contains(where: { if case .append(key, _) = $0 { true } else { false } }),
                      let writer = appender[key << 32 | last], writer.completed < operations[invoke].time else { continue }
                ops[position] = .read(key: key, value: .list(Array(list.dropLast())))
                operations[ok].value = .transaction(ops)
                corrupted = (operations[invoke].index, writer.index)
                break search
            }
        }
        let (reader, writer) = try #require(corrupted)
        let report = try timedCheck(operations, "stale-read")
        let cycles = (report.anomalies[.gSingleRealtime] ?? []) + (report.anomalies[.gSingle] ?? [])
        #expect(cycles.contains { Set($0.indices).isSuperset(of: [reader, writer]) }, "\(report)")
    }
}
