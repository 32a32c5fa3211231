// FaRM's transactional hash table in an embedded Granary cluster: a table of 64-bit keys with
// inline values, spread over every node's regions, used inside ordinary transactions (a lookup
// is one one-sided read of a bucket; an insert or update commits like any write).
//
//   swift run example-hashtable
import Foundation
import Granary

struct Stock: BitwiseCopyable {
    var quantity: Int64
    var priceCents: Int64
}

let cluster = try await Cluster.local(nodes: 3, replicas: 3)
let table = try await TransactionalHashTable<Stock>.create(name: "stock", capacity: 10_000, in: cluster)
print("table '\(table.descriptor.name)': \(table.descriptor.buckets.count) buckets of \(table.descriptor.slotsPerBucket) slots")

// Stock 1,000 items, from every node at once.
try await withThrowingTaskGroup(of: Void.self) { group in
    for node in cluster.nodes {
        group.addTask {
            for item in stride(from: UInt64(node.id.index), to: 1_000, by: cluster.nodes.count) {
                _ = try await node.transaction { tx in
                    try table.insert(item, Stock(quantity: 10, priceCents: Int64(100 + item)), in: tx)
                }
            }
        }
    }
    try await group.waitForAll()
}

// An order of three items is one transaction: all three are taken, or none.
func order(_ items: [UInt64], on node: Node) async throws -> Bool {
    try await node.transaction { tx in
        for item in items { table.prefetch(item, in: tx) }  // the three bucket reads overlap
        for item in items {
            guard let stock = try table.get(item, in: tx), stock.quantity > 0 else { return false }
        }
        for item in items { _ = try table.update(item, in: tx) { $0.quantity -= 1 } }
        return true
    }
}

var placed = 0
for round in 0..<300 {
    let items = [UInt64(round % 50), UInt64((round * 7) % 50), UInt64((round * 13 + 1) % 50)]
    guard Set(items).count == 3 else { continue }
    if try await order(items, on: cluster.nodes[round % 3]) { placed += 1 }
}

// Every item taken is accounted for: 10 per item at the start, 3 per order placed.
let left = try await cluster.nodes[1].transaction { tx in
    try (0..<1_000 as Range<UInt64>).reduce(Int64(0)) { $0 + (try table.get($1, in: tx)?.quantity ?? 0) }
}
print("orders placed: \(placed); items left \(left) (expected \(10 * 1_000 - 3 * placed))")
try await cluster.shutdown()
if left != Int64(10 * 1_000 - 3 * placed) {
    print("the stock does not add up")
    exit(1)
}
