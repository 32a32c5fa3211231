@testable import GranaryEngine
import GranaryMemory
import Testing

@Suite("Record processor: transaction table")
struct TransactionTableTests {
    /// Random inserts, overwrites and removals against `Dictionary` as the model, with keys that
    /// crowd a few probe runs (so deletions shift entries across the table's wrap-around).
    @Test("agrees with a dictionary through inserts, overwrites, removals and growth")
    func agreesWithDictionary() {
        var table = TransactionTable(minimumCapacity: 4)
        var model: [TransactionID: Int] = [:]
        var random: UInt64 = 0x1234_5678
        func next() -> UInt64 {
            random = random &* 6364136223846793005 &+ 1442695040888963407
            return random >> 33
        }
        for step in 0..<200_000 {
            // Keys from a small pool, as in-flight transactions are: every node, slot and a few sequences.
            let id = TransactionID(node: NodeID(Int(next() % 3)), slot: Int(next() % 64), sequence: next() % 8)
            switch next() % 3 {
            case 0, 1:
                let value = Int(next() % 10_000)
                let previous = table.updateValue(value, forKey: id)
                let expected = model.updateValue(value, forKey: id)
                #expect(previous == expected, "step \(step): updateValue(\(id)) returned \(String(describing: previous)), the model \(String(describing: expected))")
            default:
                let removed = table.removeValue(forKey: id)
                let expected = model.removeValue(forKey: id)
                #expect(removed == expected, "step \(step): removeValue(\(id)) returned \(String(describing: removed)), the model \(String(describing: expected))")
            }
            if step % 1_000 == 0 {
                #expect(table.count == model.count, "step \(step): \(table.count) entries, the model \(model.count)")
                for (key, value) in model where table[key] != value {
                    Issue.record("step \(step): \(key) maps to \(String(describing: table[key])), the model to \(value)")
                }
                var values: [Int] = []
                table.forEachValue { values.append($0) }
                #expect(values.sorted() == model.values.sorted(), "step \(step): the values differ from the model's")
            }
        }
    }
}
